"""The prod function's IAM policy, generated from the stage's settings (`admin --stage prod policy --write`).

Each action the code calls is one line of ACTIONS, naming the resources IAM evaluates it against (from the
Service Authorization Reference, "Actions, resources, and condition keys for AWS IoT / DynamoDB / ..."):
adding a call is adding a line; the statements, their ARNs and the region list follow. tests/test_prod_stage.py
proves that the actions are exactly what the code calls, and that the committed file is this output.
"""
import json
from typing import Any

from chalicelib.adapters.issuers.aws_iot import DEVICE_POLICY_NAME
from chalicelib.config import Settings

APP_NAME = "iot-global-provisioning"

# action -> the resource kinds IAM evaluates it against ("*": the action takes no resource ARN).
# AttachPolicy/DetachPolicy are evaluated against the *target* (cert or thing group), not the policy attached,
# so no ARN can bound which policy the role attaches: see docs/deploy.md, "IAM".
ACTIONS: dict[str, tuple[str, ...]] = {
    "logs:CreateLogGroup": ("log-group",),
    "logs:CreateLogStream": ("log-group",),
    "logs:PutLogEvents": ("log-group",),
    "dynamodb:GetItem": ("table", "nonce-table"),  # the nonce table keeps each region's IoT endpoint too
    "dynamodb:UpdateItem": ("table", "nonce-table"),  # the nonce table keeps admission's schedules too
    "dynamodb:PutItem": ("nonce-table",),  # an endpoint first looked up
    "ssm:GetParameter": ("parameters",),
    "kms:Decrypt": ("kms-key",),
    "iot:DescribeEndpoint": ("*",),
    "iot:CreateCertificateFromCsr": ("*",),
    "iot:CreateKeysAndCertificate": ("*",),
    "iot:CreateThing": ("thing",),
    "iot:DeleteThing": ("thing",),
    "iot:AttachThingPrincipal": ("thing", "cert"),
    "iot:DetachThingPrincipal": ("thing", "cert"),
    "iot:AttachPolicy": ("cert",),
    "iot:DetachPolicy": ("cert",),
    "iot:UpdateCertificate": ("cert",),
    "iot:DeleteCertificate": ("cert",),
    "iot:DescribeCertificate": ("cert",),
    "iot:ListThingPrincipals": ("thing",),
    "iot:ListCertificates": ("*",),
    "iot:ListPrincipalThings": ("*",),
    "dynamodb:DescribeTable": ("table",),
    "iot:CreatePolicy": ("device-policy",),
}

# Statement ids, in the file's order, per resource kinds.
_SIDS = {("log-group",): "OwnLogGroup", ("table",): "Registry", ("nonce-table",): "Nonces",
         ("table", "nonce-table"): "RegistryAndNonces",
         ("parameters",): "Parameters", ("kms-key",): "IpstackKeyDecrypt", ("*",): "IotAccountLevel",
         ("thing",): "IotThings", ("thing", "cert"): "IotThingPrincipals", ("cert",): "IotCertificates",
         ("device-policy",): "IotDevicePolicy"}


def function_name(stage: str) -> str:
    """The Lambda function's name as chalice deploys it (its log group is /aws/lambda/<name>)."""
    return f"{APP_NAME}-{stage}"


def resources(config: Settings, account: str = "*") -> dict[str, list[str]]:
    """ARNs per resource kind. Regional IoT resources only in the enabled regions; the table, the parameter,
    the key and the log group live in the function's home region, which the settings do not name."""
    def iot(region: str, path: str) -> str:
        return f"arn:aws:iot:{region}:{account}:{path}"
    regions = sorted(config.enabled_regions)
    return {
        # chalice deploy names the function; in chalice package's template CloudFormation names it
        # <stack>-APIHandler-<suffix>, unknown here.
        "log-group": [f"arn:aws:logs:*:{account}:log-group:/aws/lambda/{function_name(config.stage)}:*",
                      f"arn:aws:logs:*:{account}:log-group:/aws/lambda/*-APIHandler-*:*"],
        "table": [f"arn:aws:dynamodb:*:{account}:table/{config.table_name}"],
        "nonce-table": [f"arn:aws:dynamodb:*:{account}:table/{config.table_name}-nonces"],
        # the fleet public key(s) and the ipstack key
        "parameters": [f"arn:aws:ssm:*:{account}:parameter/{name.lstrip('/')}"
                       for name in (config.fleet_public_key_parameter, config.ipstack_key_parameter) if name],
        "kms-key": [config.kms_key_arn] if config.kms_key_arn else [],
        "*": ["*"],
        "thing": [iot(r, "thing/*") for r in regions],
        "cert": [iot(r, "cert/*") for r in regions],
        "device-policy": [iot(r, f"policy/{DEVICE_POLICY_NAME}") for r in regions],
    }


def policy_document(config: Settings, account: str = "*") -> dict[str, Any]:
    arns = resources(config, account)
    statements = []
    for kinds, sid in _SIDS.items():
        actions = sorted(a for a, k in ACTIONS.items() if k == kinds)
        resource = [arn for kind in kinds for arn in arns[kind]]
        if not (actions and resource):  # no parameter or no key configured: no statement for it
            continue
        statement: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": actions,
                                     "Resource": resource[0] if len(resource) == 1 else resource}
        if kinds == ("*",):  # no resource ARN to scope: the enabled regions are the bound IAM can express
            statement["Condition"] = {"StringEquals": {"aws:RequestedRegion": sorted(config.enabled_regions)}}
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}


def render(config: Settings, account: str = "*") -> str:
    return json.dumps(policy_document(config, account), indent=2) + "\n"
