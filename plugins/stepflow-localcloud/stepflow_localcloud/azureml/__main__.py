"""``python -m stepflow_localcloud.azureml``: serve the local Azure ML control plane until signalled."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys

from .._common import env_pair, rate
from .server import DEFAULT_SUBSCRIPTION, LocalAzureML


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m stepflow_localcloud.azureml",
                                description="A local Azure ML workspace over HTTPS, running command jobs on Docker.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    p.add_argument("--subscription-id", default=DEFAULT_SUBSCRIPTION)
    p.add_argument("--resource-group", default="stepflow-rg")
    p.add_argument("--workspace-name", default="stepflow-ws")
    p.add_argument("--location", default="eastus")
    p.add_argument("--compute", action="append", default=None, metavar="NAME",
                   help="a compute cluster of the workspace (repeatable; default: cpu-cluster)")
    p.add_argument("--certificate-file", default=None,
                   help="also copy the server's self-signed certificate (PEM) to this path, for clients to trust")
    p.add_argument("--throttle-rate", type=rate, default=0.0, help="fraction of API calls answered HTTP 429")
    p.add_argument("--error-rate", type=rate, default=0.0, help="fraction of API calls answered HTTP 503")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault-injection RNG")
    p.add_argument("--network", default="host", help="Docker network mode of the job containers")
    p.add_argument("--docker-url", default=None, help="Docker daemon (default: DOCKER_HOST or the local socket)")
    p.add_argument("--stop-grace", type=float, default=2.0, help="seconds from SIGTERM to SIGKILL on cancel")
    p.add_argument("--phase-delay", type=float, default=0.0,
                   help="seconds spent in Starting, Preparing, Queued and Finalizing, so pollers see them")
    p.add_argument("--env", type=env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="environment of every job container, standing in for the compute's managed identity "
                        "(repeatable)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM, then cancel every job and remove its container."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalAzureML(host=args.host, port=args.port, subscription_id=args.subscription_id,
                            resource_group=args.resource_group, workspace_name=args.workspace_name,
                            location=args.location, computes=tuple(args.compute or ("cpu-cluster",)),
                            container_env=dict(args.env), throttle_rate=args.throttle_rate,
                            error_rate=args.error_rate, seed=args.seed, network=args.network,
                            docker_url=args.docker_url, stop_grace=args.stop_grace,
                            phase_delay=args.phase_delay) as backend:
        certificate = backend.certificate_file
        if args.certificate_file:
            shutil.copyfile(certificate, args.certificate_file)
            certificate = args.certificate_file
        print(f"local Azure ML listening on {backend.url}", flush=True)
        print(f"certificate: {certificate}", flush=True)
        print(f"workspace: {backend.workspace_path}", flush=True)
        await stop.wait()
        print("cancelling jobs and removing their containers", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
