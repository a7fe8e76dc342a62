"""Remote artifact store flavors: s3, gcs and azure.

Light on purpose: only the config classes live here. The implementation (fsspec and the cloud
SDK behind it) is imported when a component of one of these flavors is created.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from stepflow.errors import StorePathError
from stepflow.interfaces.flavor import Flavor, option


def _check_path(instance: _RemoteStoreConfig, attribute: Any, value: str) -> None:
    """The root URI must use one of the flavor's schemes and name a bucket (container)."""
    if "{{" in value:  # an {{env.VAR}} reference: checked again once resolved
        return
    flavor, schemes = type(instance).flavor, type(instance).schemes
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise StorePathError(f"{flavor} artifact store path must start with {wanted}, got {value!r}")
    if not rest.strip("/"):
        raise StorePathError(f"{flavor} artifact store path must name a {type(instance).bucket_word}: "
                         f"{scheme}://{type(instance).bucket_word.upper()}[/PREFIX], got {value!r}")


@attrs.frozen
class _RemoteStoreConfig:
    """Options every remote artifact store has."""

    flavor: ClassVar[str] = ""
    schemes: ClassVar[tuple[str, ...]] = ()
    bucket_word: ClassVar[str] = "bucket"

    path: str = option(doc="Root URI every artifact lives under, e.g. s3://bucket/prefix.")

    @path.validator
    def _path_ok(self, attribute: Any, value: str) -> None:
        _check_path(self, attribute, value)


@attrs.frozen
class S3ArtifactStoreConfig(_RemoteStoreConfig):
    """Options of the S3 (or S3-compatible) artifact store."""

    flavor: ClassVar[str] = "s3"
    schemes: ClassVar[tuple[str, ...]] = ("s3",)

    endpoint_url: str | None = option(None, doc="S3 API address for S3-compatible services (MinIO, moto...).")
    region: str | None = option(None, doc="AWS region of the bucket (default: from the AWS config).")
    key: str | None = option(None, doc="Access key id (default: the AWS credential chain).")
    secret: str | None = option(None, doc="Secret access key; use {{env.VAR}} to keep it out of the store.",
                                secret=True)
    profile: str | None = option(None, doc="Named profile of the AWS config files.")


@attrs.frozen
class GCSArtifactStoreConfig(_RemoteStoreConfig):
    """Options of the Google Cloud Storage artifact store."""

    flavor: ClassVar[str] = "gcs"
    schemes: ClassVar[tuple[str, ...]] = ("gs", "gcs")

    project: str | None = option(None, doc="Google Cloud project (default: from the environment).")
    endpoint_url: str | None = option(None, doc="Storage API address, for emulators (default: Google's).")
    token: str | None = option(None, doc="Service-account JSON file, or 'anon' (default: application "
                               "default credentials).", secret=True)


@attrs.frozen
class AzureArtifactStoreConfig(_RemoteStoreConfig):
    """Options of the Azure Blob Storage artifact store."""

    flavor: ClassVar[str] = "azure"
    schemes: ClassVar[tuple[str, ...]] = ("az", "abfs", "abfss")
    bucket_word: ClassVar[str] = "container"

    account_name: str | None = option(None, doc="Storage account name.")
    account_key: str | None = option(None, doc="Storage account key; use {{env.VAR}}.", secret=True)
    connection_string: str | None = option(None, doc="Full connection string (instead of name and key).",
                                           secret=True)
    endpoint_url: str | None = option(None, doc="Blob service URL, for Azurite e.g. "
                                      "http://127.0.0.1:10000/devstoreaccount1 (default: the account's).")


class _RemoteStoreFlavor(Flavor):
    kind = "artifact_store"
    is_remote = True


class S3ArtifactStoreFlavor(_RemoteStoreFlavor):
    """Artifacts in an S3 bucket (or any S3-compatible object store)."""

    name = "s3"
    description = "Objects in an S3 (or S3-compatible) bucket, reachable by remote jobs. Needs stepflow[s3]."
    config_class = S3ArtifactStoreConfig
    implementation = "stepflow._components.fsspec_store:S3ArtifactStore"


class GCSArtifactStoreFlavor(_RemoteStoreFlavor):
    """Artifacts in a Google Cloud Storage bucket."""

    name = "gcs"
    description = "Objects in a Google Cloud Storage bucket, reachable by remote jobs. Needs stepflow[gcs]."
    config_class = GCSArtifactStoreConfig
    implementation = "stepflow._components.fsspec_store:GCSArtifactStore"


class AzureArtifactStoreFlavor(_RemoteStoreFlavor):
    """Artifacts in an Azure Blob Storage container."""

    name = "azure"
    description = "Blobs in an Azure Storage container, reachable by remote jobs. Needs stepflow[azure]."
    config_class = AzureArtifactStoreConfig
    implementation = "stepflow._components.fsspec_store:AzureArtifactStore"
