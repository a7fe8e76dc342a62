"""``python -m stepflow_localcloud.vertex``: serve the local Vertex AI control plane until signalled."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .._common import env_pair, rate
from .server import DEFAULT_LOCATION, DEFAULT_PROJECT, LocalVertex


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m stepflow_localcloud.vertex",
                                description="A local Vertex AI custom-job service (gRPC) running jobs on Docker.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one (printed on start)")
    p.add_argument("--http-port", type=int, default=0,
                   help="port of the HTTP test hooks (/_fake/stats, /_fake/config, /_fake/reset); 0 picks a free "
                        "one, -1 serves none")
    p.add_argument("--tls-port", type=int, default=None,
                   help="also serve with TLS on this port (0 picks a free one), under a self-signed certificate "
                        "made at start: what the high-level google.cloud.aiplatform SDK needs")
    p.add_argument("--certificate-file", default=None,
                   help="where to write that certificate (PEM) for GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (default: a "
                        "temporary file, printed on start)")
    p.add_argument("--project", default=DEFAULT_PROJECT)
    p.add_argument("--location", default=DEFAULT_LOCATION)
    p.add_argument("--project-number", default=None, help="also accepted for the project in resource names")
    p.add_argument("--resource-exhausted-rate", type=rate, default=0.0,
                   help="fraction of CreateCustomJob calls answered RESOURCE_EXHAUSTED (quota)")
    p.add_argument("--unavailable-rate", type=rate, default=0.0, help="fraction of all calls answered UNAVAILABLE")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault-injection RNG")
    p.add_argument("--network", default="host", help="Docker network mode of the job containers")
    p.add_argument("--docker-url", default=None, help="Docker daemon (default: DOCKER_HOST or the local socket)")
    p.add_argument("--gcs-endpoint", default=None,
                   help="GCS emulator URL given to job containers as STORAGE_EMULATOR_HOST")
    p.add_argument("--env", type=env_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every job container (repeatable)")
    p.add_argument("--stop-grace", type=float, default=2.0, help="seconds from SIGTERM to SIGKILL on cancel")
    p.add_argument("--phase-delay", type=float, default=0.0,
                   help="seconds spent in JOB_STATE_QUEUED and in JOB_STATE_PENDING, so pollers see them")
    p.add_argument("--keep-containers", action="store_true", help="leave ended jobs' containers on the daemon")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Run until SIGINT/SIGTERM, then cancel every job and remove its container."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalVertex(host=args.host, port=args.port, http_port=None if args.http_port < 0 else args.http_port,
                           project=args.project, location=args.location, project_number=args.project_number,
                           resource_exhausted_rate=args.resource_exhausted_rate,
                           unavailable_rate=args.unavailable_rate, seed=args.seed, network=args.network,
                           docker_url=args.docker_url, gcs_endpoint=args.gcs_endpoint, container_env=dict(args.env),
                           stop_grace=args.stop_grace, phase_delay=args.phase_delay,
                           keep_containers=args.keep_containers, tls_port=args.tls_port,
                           certificate_file=args.certificate_file) as backend:
        print(f"local Vertex AI listening on {backend.endpoint} ({backend.parent})", flush=True)
        if backend.tls_endpoint:
            print(f"TLS on {backend.tls_endpoint}, certificate in {backend.certificate_file}", flush=True)
        if backend.http_url:
            print(f"test hooks on {backend.http_url}/_fake/", flush=True)
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
