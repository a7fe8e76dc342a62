"""``python -m stepflow_localcloud.sagemaker``: serve the local SageMaker control plane until signalled."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .._common import env_pair, rate
from .credentials import RoleCredentials
from .server import LocalSageMaker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m stepflow_localcloud.sagemaker",
                                description="A local SageMaker training-job service running jobs on Docker.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    p.add_argument("--logs-endpoint", default=None,
                   help="CloudWatch Logs endpoint (moto's URL) that receives the jobs' output")
    p.add_argument("--aws-endpoint", default=None,
                   help="AWS_ENDPOINT_URL given to containers (default: --logs-endpoint)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3 the service moves job data through: input channels, checkpoints, model.tar.gz "
                        "(default: --aws-endpoint, else --logs-endpoint)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--account-id", default="123456789012")
    p.add_argument("--throttle-rate", type=rate, default=0.0, help="fraction answered ThrottlingException")
    p.add_argument("--error-rate", type=rate, default=0.0, help="fraction answered HTTP 500/503")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault-injection RNG")
    p.add_argument("--network", default="host", help="Docker network mode of the job containers")
    p.add_argument("--docker-url", default=None, help="Docker daemon (default: DOCKER_HOST or the local socket)")
    p.add_argument("--stop-grace", type=float, default=2.0, help="seconds from SIGTERM to SIGKILL on stop")
    p.add_argument("--phase-delay", type=float, default=0.0,
                   help="seconds spent in Starting and Uploading, so pollers see them")
    p.add_argument("--env", type=env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every job container (repeatable)")
    creds = p.add_argument_group(
        "job role credentials",
        "Served to every job's container as its execution role's, through AWS_CONTAINER_CREDENTIALS_FULL_URI. "
        "Default: this process's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else "
        "moto's test keys.")
    creds.add_argument("--role-access-key-id", default=None)
    creds.add_argument("--role-secret-access-key", default=None)
    creds.add_argument("--role-session-token", default=None)
    creds.add_argument("--credentials-port", type=int, default=0,
                       help="port of the credentials endpoint on 127.0.0.1 (0 picks a free one)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if (args.role_access_key_id is None) != (args.role_secret_access_key is None):
        p.error("--role-access-key-id and --role-secret-access-key go together")
    if args.role_session_token is not None and args.role_access_key_id is None:
        p.error("--role-session-token needs --role-access-key-id and --role-secret-access-key")
    return args


def role_credentials(args: argparse.Namespace) -> RoleCredentials:
    """The credentials the options name, else the ones of this process's environment."""
    if args.role_access_key_id is None:
        return RoleCredentials.from_environment()
    return RoleCredentials(args.role_access_key_id, args.role_secret_access_key, args.role_session_token)


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM, then stop every job and remove its container."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalSageMaker(host=args.host, port=args.port, logs_endpoint=args.logs_endpoint,
                              aws_endpoint=args.aws_endpoint, region=args.region, account_id=args.account_id,
                              throttle_rate=args.throttle_rate, error_rate=args.error_rate, seed=args.seed,
                              network=args.network, docker_url=args.docker_url, stop_grace=args.stop_grace,
                              phase_delay=args.phase_delay, container_env=dict(args.env),
                              role_credentials=role_credentials(args),
                              credentials_port=args.credentials_port, s3_endpoint=args.s3_endpoint) as backend:
        print(f"local SageMaker listening on {backend.url}", flush=True)
        print(f"job role credentials served on {backend.credentials.url}", flush=True)
        await stop.wait()
        print("stopping jobs and removing their containers", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
