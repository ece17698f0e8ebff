"""AWS IoT's real semantics where moto is looser (issue 16), reproduced with botocore event hooks on the
service's own IoT clients, each citing the AWS API reference page it follows.

CreateThing, https://docs.aws.amazon.com/iot/latest/apireference/API_CreateThing.html : "If this call is made
multiple times using the same thing name and configuration, the call will succeed. If this call is made with the
same thing name but different configuration a ResourceAlreadyExistsException is thrown." moto answers success
either way (tests/aws_iot_semantics.py makes it answer as AWS does).

What the service does about it: each CreateThing carries an attribute of its own call, so its success says this
attempt made the thing (a rollback deletes only that), with no DescribeThing first; a thing that exists with no
certificate attached is adopted (kept as it is, and never deleted by a rollback); one with another certificate
attached is refused with 409 `thing-exists`, naming the thing and the region, and nothing is left behind.
"""
# ruff: noqa: F811 - `backend` is the fixture imported from test_exactly_once, taken as an argument
import pytest
from botocore.exceptions import ClientError
from cryptography import x509

from chalicelib.adapters.issuers.aws_iot import ATTEMPT_ATTRIBUTE
from chalicelib.domain.errors import AlreadyProvisioned, ServiceUnavailable
from tests.conftest import LONDON_IP, make_csr
from tests.test_exactly_once import backend, iot_fault  # noqa: F401 - the two-backend fixture

pytestmark = pytest.mark.parametrize("backend", ["aws"], indirect=True)
REGION = "eu-west-2"


def aws_error(operation: str, code: str, status: int = 409) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "injected as AWS answers"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def create_thing_as_aws_does(backend) -> list:
    """The backend's IoT clients answer CreateThing as AWS does (tests/aws_iot_semantics.py, set up with the
    backend): the names of the things it was refused for."""
    return backend.refused_things


def test_whether_this_attempt_made_the_thing_is_told_by_create_things_answer_alone(backend):
    """No DescribeThing: a thing this call made carries its attribute; the next CreateThing for it, with an attribute
    of its own, is refused as AWS refuses it, so that attempt knows the thing is not its own to delete."""
    refusals = create_thing_as_aws_does(backend)
    csr = x509.load_pem_x509_csr(make_csr("dev-5")[0].encode())

    first = backend.issuer.issue("dev-5", REGION, csr)
    made = backend.look[REGION].describe_thing(thingName="dev-5")["attributes"]
    backend.issuer.revoke(first, delete_thing=False)  # its certificate goes, the thing stays
    second = backend.issuer.issue("dev-5", REGION, csr)

    assert (first.created_thing, second.created_thing) == (True, False) and refusals == ["dev-5"]
    assert list(made) == [ATTEMPT_ATTRIBUTE]
    assert backend.look[REGION].describe_thing(thingName="dev-5")["attributes"] == made  # adopted as it was
    assert backend.calls["DescribeThing"] == 0


def test_a_thing_made_beforehand_with_no_certificate_is_adopted_as_it_is(backend):
    create_thing_as_aws_does(backend)
    backend.look[REGION].create_thing(thingName="dev-1", attributePayload={"attributes": {"line": "3"}})

    result = backend.service().provision(backend.request("dev-1", make_csr("dev-1")[0]), LONDON_IP)

    backend.assert_provisioned("dev-1", result)
    assert result.issued.created_thing is False
    assert backend.look[REGION].describe_thing(thingName="dev-1")["attributes"] == {"line": "3"}  # untouched


def test_a_rollback_never_deletes_a_thing_this_attempt_did_not_make(backend):
    create_thing_as_aws_does(backend)
    backend.look[REGION].create_thing(thingName="dev-2", attributePayload={"attributes": {"line": "3"}})

    with iot_fault(backend, "AttachThingPrincipal"):
        with pytest.raises(ServiceUnavailable):
            backend.service().provision(backend.request("dev-2", make_csr("dev-2")[0]), LONDON_IP)

    assert backend.things("dev-2") == [REGION]  # the operator's thing stays
    assert backend.look[REGION].list_thing_principals(thingName="dev-2")["principals"] == []
    assert backend.calls["DeleteThing"] == 0
    assert backend.active_certificates("dev-2") == set()
    assert backend.registry.get("dev-2").status == "unprovisioned"
    backend.assert_provisioned("dev-2", backend.service().provision(backend.request("dev-2", make_csr("dev-2")[0]),
                                                                     LONDON_IP))


def test_a_thing_another_certificate_uses_is_refused_with_409_naming_thing_and_region(backend):
    create_thing_as_aws_does(backend)
    look = backend.look[REGION]
    look.create_thing(thingName="dev-3")
    other = look.create_keys_and_certificate(setAsActive=True)
    look.attach_thing_principal(thingName="dev-3", principal=other["certificateArn"])

    with pytest.raises(AlreadyProvisioned) as refused:
        backend.service().provision(backend.request("dev-3", make_csr("dev-3")[0]), LONDON_IP)

    assert refused.value.code == "thing-exists"
    assert "dev-3" in refused.value.message and REGION in refused.value.message
    # Nothing of this attempt is left, and what was there before is as it was.
    assert backend.active_certificates("dev-3") == {(REGION, other["certificateId"])}
    assert look.list_thing_principals(thingName="dev-3")["principals"] == [other["certificateArn"]]
    assert backend.registry.get("dev-3").status == "unprovisioned"


def test_a_thing_made_by_someone_else_just_before_our_create_thing_is_adopted(backend):
    """Another party makes the thing, with its own configuration, after the device was claimed and just before our
    CreateThing reaches AWS: AWS answers ResourceAlreadyExistsException, and the thing (no certificate) is adopted
    as it is."""
    look = backend.look[REGION]
    raced = []

    def made_meanwhile(params, **_):
        if not raced:
            raced.append(True)
            look.create_thing(thingName=params["thingName"], attributePayload={"attributes": {"by": "ops"}})
    backend.iot[REGION].meta.events.register_first("provide-client-params.iot.CreateThing", made_meanwhile)
    refusals = create_thing_as_aws_does(backend)

    result = backend.service().provision(backend.request("dev-4", make_csr("dev-4")[0]), LONDON_IP)

    assert raced and refusals == ["dev-4"]  # CreateThing was tried once, and refused as AWS does
    backend.assert_provisioned("dev-4", result)
    assert result.issued.created_thing is False
    assert look.describe_thing(thingName="dev-4")["attributes"] == {"by": "ops"}
