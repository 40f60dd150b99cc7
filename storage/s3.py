"""Cloudflare R2 (or any S3 API: AWS S3, MinIO) as the object store, through boto3."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
from botocore.config import Config

from storage.objects import StoredObject

logger = logging.getLogger(__name__)

# Keys are content-addressed: an object never changes, so clients and CDNs may keep it forever.
IMMUTABLE = "public, max-age=31536000, immutable"


def r2_endpoint(account_id: str) -> str:
    return f"https://{account_id}.r2.cloudflarestorage.com"


def make_s3_client(endpoint_url: str, access_key_id: str, secret_access_key: str, region: str = "auto"):
    # "standard" retries back off on throttling, 5xx and connection errors (R2 answers 5xx at times).
    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=30,
                    signature_version="s3v4")
    return boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret_access_key, region_name=region, config=config)


class S3ObjectStore:
    def __init__(self, client, bucket: str, public_base_url: str | None = None,
                 presign_seconds: int = 7 * 24 * 3600) -> None:
        self.client, self.bucket = client, bucket
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.presign_seconds = presign_seconds

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                               CacheControl=IMMUTABLE)
        return StoredObject(self.url_for(key))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def url_for(self, key: str, storage: str = "") -> str:
        """A public URL when the bucket has one, else a presigned GET (signed locally, no request)."""
        if self.public_base_url:
            return f"{self.public_base_url}/{key}"
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=self.presign_seconds)

    def local_path(self, key: str) -> Path | None:
        return None
