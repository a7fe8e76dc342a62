"""A training job's data on S3, moved as SageMaker moves it (File mode).

- Input channels: every object under an ``S3Prefix`` channel's URI is copied to
  ``/opt/ml/input/data/<channel>/`` before the container starts; an empty prefix fails the job.
- Checkpoints: ``CheckpointConfig.S3Uri`` is copied to its ``LocalPath`` (default
  ``/opt/ml/checkpoints``) at start, and the local files are copied back at the end.
- Artifacts: ``/opt/ml/model`` is packed into ``<S3OutputPath>/<job>/output/model.tar.gz`` and
  ``/opt/ml/output/data`` into ``.../output/output.tar.gz``.
- ``/opt/ml/output/failure``: its first 1,024 characters are the job's FailureReason.

Reasons are the service's ``ClientError: ...`` texts: a failed transfer fails the job with a
reason naming the URI, never the control plane.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterator
from typing import Any

from aiodocker.exceptions import DockerError

FAILURE_FILE = "/opt/ml/output/failure"
FAILURE_LIMIT = 1024
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"


class DataError(Exception):
    """A transfer the job needs failed; the message is the job's FailureReason."""


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _relative(key: str, prefix: str) -> str:
    """A key's path below its channel's prefix (the service keeps the rest of the key as is)."""
    rest = key[len(prefix):].lstrip("/")
    return rest or key.rsplit("/", 1)[-1]


class S3Data:
    """Transfers of one control plane, through an aiobotocore S3 client holding the jobs' role."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3

    async def _objects(self, uri: str) -> list[str]:
        bucket, prefix = split_uri(uri)
        keys: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self.s3.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in page.get("Contents") or [] if not o["Key"].endswith("/")]
            token = page.get("NextContinuationToken")
            if not token:
                return keys

    async def check_bucket(self, uri: str, what: str) -> None:
        """Fail the job now, as the service would at upload time, when ``uri``'s bucket is missing."""
        bucket, _ = split_uri(uri)
        try:
            await self.s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            raise DataError(f"ClientError: {what} {uri}: the bucket '{bucket}' does not exist or the role "
                            f"cannot reach it ({_code(exc)}). Please ensure the bucket exists in the job's "
                            "region and the role has s3:ListBucket and s3:PutObject permissions on it.") from None

    async def download(self, uri: str, local_dir: str, *, required: bool) -> bytes | None:
        """A tar (rooted at /) of every object under ``uri`` placed below ``local_dir``; None when empty.

        ``required`` (an input channel) makes an empty or unreadable prefix the job's failure.
        """
        bucket, prefix = split_uri(uri)
        try:
            keys = await self._objects(uri)
        except Exception as exc:
            if not required:
                raise DataError(f"ClientError: Unable to download checkpoints from {uri}: {_code(exc)}") from None
            keys = []
        if not keys:
            if required:
                raise DataError(f'ClientError: No S3 objects found under S3 URL "{uri}" given in input data '
                                "source. Please ensure that the bucket exists in the selected region, that "
                                f"objects exist under that S3 prefix, and that the role has s3:ListBucket "
                                f'permissions on bucket "{bucket}".')
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key in keys:
                body = await self.s3.get_object(Bucket=bucket, Key=key)
                async with body["Body"] as stream:
                    data = await stream.read()
                info = tarfile.TarInfo(f"{local_dir.strip('/')}/{_relative(key, prefix)}")
                info.size, info.mode = len(data), 0o666
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    async def pack(self, container: Any, path: str, uri: str, *, always: bool) -> bool:
        """Upload ``path`` of the container as a tar.gz of its contents to ``uri``.

        An empty directory is uploaded (as an empty archive) only when ``always``; returns whether it was.
        """
        files = list(await _read_dir(container, path))
        if not files and not always:
            return False
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        await self._put(uri, buf.getvalue(), "Unable to upload the model artifacts to")
        return True

    async def sync_up(self, container: Any, path: str, uri: str) -> int:
        """Copy every file below ``path`` of the container to ``uri``; returns the count."""
        files = list(await _read_dir(container, path))
        for name, data in files:
            await self._put(f"{uri.rstrip('/')}/{name}", data, "Unable to upload checkpoints to")
        return len(files)

    async def _put(self, uri: str, data: bytes, what: str) -> None:
        bucket, key = split_uri(uri)
        try:
            await self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise DataError(f"ClientError: {what} {uri}: {_code(exc)}") from None


async def failure_text(container: Any) -> str | None:
    """The first 1,024 characters of the container's failure file, or None when it wrote none."""
    files = await _read_dir(container, FAILURE_FILE)
    for _, data in files:
        return data.decode("utf-8", "replace")[:FAILURE_LIMIT]
    return None


async def _read_dir(container: Any, path: str) -> list[tuple[str, bytes]]:
    """(path below ``path``, content) of each regular file; a file ``path`` gives its own name."""
    try:
        tar = await container.get_archive(path)
    except DockerError as exc:
        if exc.status == 404:
            return []
        raise
    with contextlib.closing(tar):
        return list(_files(tar))


def _files(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    for member in tar.getmembers():
        if not member.isfile():
            continue
        root, _, rest = member.name.partition("/")
        handle = tar.extractfile(member)
        if handle is not None:
            yield rest or root, handle.read()


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        return f"{error.get('Code', type(exc).__name__)}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"
