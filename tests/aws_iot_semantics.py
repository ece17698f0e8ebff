"""AWS IoT's CreateThing as AWS answers it, where moto is looser: a botocore event hook on the service's own clients.

CreateThing, https://docs.aws.amazon.com/iot/latest/apireference/API_CreateThing.html : "If this call is made
multiple times using the same thing name and configuration, the call will succeed. If this call is made with the
same thing name but different configuration a ResourceAlreadyExistsException is thrown." moto answers success
either way, and replaces the thing's attributes with the ones asked for.
"""
from typing import Any, Iterable

from botocore.exceptions import ClientError


def create_thing_as_aws_does(clients: Iterable[Any], look: Any, refused: list | None = None) -> list:
    """On each of `clients`, CreateThing for an existing thing with a different configuration (attributes, thing
    type) raises ResourceAlreadyExistsException; the same configuration succeeds. `look`: a client of the same
    region that the hook reads the thing with (never hooked). Returns the names of the things it was refused for
    (`refused`, when given, is that list)."""
    refused = [] if refused is None else refused

    def hook(params, **_):
        try:
            found = look.describe_thing(thingName=params["thingName"])
        except look.exceptions.ResourceNotFoundException:
            return
        asked = params.get("attributePayload", {}).get("attributes", {})
        if found.get("attributes", {}) != asked or found.get("thingTypeName") != params.get("thingTypeName"):
            refused.append(params["thingName"])
            raise ClientError({"Error": {"Code": "ResourceAlreadyExistsException",
                                         "Message": "injected as AWS answers"},
                               "ResponseMetadata": {"HTTPStatusCode": 409}}, "CreateThing")
    for client in clients:
        client.meta.events.register("provide-client-params.iot.CreateThing", hook)
    return refused
