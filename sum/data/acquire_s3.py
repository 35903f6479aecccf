"""The ``s3`` source kind of the ``acquire`` stage (spec §3): every object under an S3 prefix; an
object's single-part ETag (its md5) vouches for a file already there."""

from __future__ import annotations

import contextlib

from sum.data.acquire_common import AcquireError, HashingWriter, Item, Source, select_paths
from sum.io import CHUNK, s3_client, s3_error_line, split_s3_uri


class S3Source(Source):
    """Every object under an S3 prefix (``uri``), listed ``page_size`` keys a page."""

    def __init__(self, *a, page_size: int):
        super().__init__(*a)
        self.bucket, prefix = split_s3_uri(self.src.uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self.client = None
        self.page_size = page_size
        self.where = f"s3://{self.bucket}/{self.prefix}"

    def _client(self):
        if self.client is None:
            self.client = s3_client(self.s3)
        return self.client

    def plan(self, old_files, hashes):
        from botocore.exceptions import BotoCoreError, ClientError  # heavy, and only for s3 sources

        base = f"s3://{self.bucket}/{self.prefix}"
        objects: dict[str, dict] = {}
        try:
            for page in (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self.page_size})
            ):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # "folder" marker objects hold no data
                        objects[obj["Key"][len(self.prefix) :]] = obj
        except (ClientError, BotoCoreError) as e:
            raise AcquireError(s3_error_line(base, e)) from None
        if not objects:
            raise AcquireError(f"{base}: no objects under this prefix")
        chosen = select_paths(
            sorted(objects), self.src, base, lambda m: f"{base}{m}: no such key (listed in {self.key}.members)"
        )
        return [
            Item(
                "",
                f"{base}{p}",
                sha,
                int(objects[p]["Size"]),
                objects[p].get("ETag", "").strip('"').lower(),
                path=p,
            )
            for p, sha in chosen
        ]

    @contextlib.contextmanager
    def session(self, pending, progress):
        from botocore.exceptions import BotoCoreError, ClientError  # heavy, and only for s3 sources

        client = self._client()

        def fetch(item: Item, w: HashingWriter) -> None:
            try:
                body = client.get_object(Bucket=self.bucket, Key=item.src[len(f"s3://{self.bucket}/") :])["Body"]
                with contextlib.closing(body):
                    for chunk in body.iter_chunks(CHUNK):
                        w.write(chunk)
            except (ClientError, BotoCoreError) as e:
                raise AcquireError(s3_error_line(item.src, e)) from None

        yield fetch

