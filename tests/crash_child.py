"""A child process for the crash tests: the app served by chalice local's own server, with the stage's settings
from the environment, and a step checkpoint injected into the service (no patching) that can stop a request
dead at a named step boundary: it writes a marker file and waits there for the parent's `kill -9`. On AWS IoT
(moto's server) CreateThing answers as AWS does (tests/aws_iot_semantics.py).

    python -m tests.crash_child --port PORT [--pause-at BOUNDARY --marker FILE]

BOUNDARY: claimed|issued|committed (provisioning) or renewal-claimed|-issued|-committed: the
issuance sequence's stages (chalicelib/services/saga.py).
"""
import argparse
import os
import sys
import time
from pathlib import Path

from chalicelib.config import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pause-at", default="")
    parser.add_argument("--marker", default="")
    args = parser.parse_args()

    from chalice.config import Config
    from chalice.local import create_local_server

    from chalicelib.container import Container
    from chalicelib.edge.http import create_app

    def checkpoint(boundary: str, thing_name: str) -> None:
        if boundary == args.pause_at:
            marker = Path(args.marker)
            marker.with_suffix(".tmp").write_text(f"{boundary} {thing_name} {os.getpid()}")
            marker.with_suffix(".tmp").rename(marker)  # the parent never reads half a marker
            while True:  # until SIGKILL
                time.sleep(60)

    parts = Container(Settings.from_env(), checkpoint=checkpoint)
    if parts.settings.issuer == "aws-iot":  # moto's server answers CreateThing looser than AWS: as AWS does
        import boto3

        from tests.aws_iot_semantics import create_thing_as_aws_does
        for region in parts.settings.enabled_regions:
            create_thing_as_aws_does([parts.aws.client("iot", region, retries=retries) for retries in (True, False)],
                                     boto3.client("iot", region_name=region))
    app = create_app(parts)
    server = create_local_server(app, Config.create(chalice_stage="local", app_name="crash-child",
                                                    lambda_timeout=60), "127.0.0.1", args.port)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
