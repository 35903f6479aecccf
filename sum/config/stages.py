"""Config schema of the model and of every stage after the data: embed, pseudolabel, refine,
uncertainty, method, train, eval, seeds, recipe, tracking, registry, flow; and `Config`, the whole of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from sum.config.data import DataConfig, StorageConfig


@dataclass
class ModelConfig:
    """SAM architecture, task prompt and weights (spec §2). Sizes of the official builds live in
    ``params/model/{vit_b,vit_l,vit_h,mobile_sam,tiny}.yaml``."""

    name: str = "mobile_sam"
    encoder: str = "tiny_vit"  # "vit" (SAM ImageEncoderViT) or "tiny_vit" (MobileSAM)
    img_size: int = 1024
    patch_size: int = 16  # output stride of the encoder: embedding is img_size // patch_size
    # ImageEncoderViT
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: List[int] = field(default_factory=lambda: [2, 5, 8, 11])
    window_size: int = 14
    # TinyViT
    tiny_vit_embed_dims: List[int] = field(default_factory=lambda: [64, 128, 160, 320])
    tiny_vit_depths: List[int] = field(default_factory=lambda: [2, 2, 6, 2])
    tiny_vit_num_heads: List[int] = field(default_factory=lambda: [2, 4, 5, 10])
    tiny_vit_window_sizes: List[int] = field(default_factory=lambda: [7, 7, 14, 7])
    # prompt encoder and mask decoder
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # task prompt (spec §2.2)
    use_task_prompt: bool = True
    num_task_prompts: int = 4
    zero_token_no_grad: bool = True
    # weights: local path, s3://bucket/key or https://..., with an optional sha256
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    # encoder speed (sum.model.fast): "auto" = bf16 autocast + fused attention on CUDA; on CPU, bf16
    # autocast + channels_last for TinyViT where the CPU has native bf16 (measured 3x), else fp32
    fast_path: str = "auto"
    compile_encoder: bool = False  # torch.compile the encoder forward (for CUDA; sum.model.fast)
    device: str = "auto"  # "auto" = cuda if available else cpu


@dataclass
class EmbedConfig:
    """The ``embed`` stage (`run_embed`): where embeddings go, of which datasets, stored how."""

    out_dir: str = "data/embeddings"
    datasets: List[str] = field(default_factory=list)  # names in data.datasets; empty = all
    dtype: str = "float16"  # float16 | float32: storage dtype of the features; loading gives fp32


@dataclass
class PseudoConfig:
    """The ``pseudolabel`` stage (spec §3.3-3.5).

    The generator settings are `MaskGenerator`'s (spec §3.3 defaults); ``min_ratio``,
    ``max_ratio`` and ``max_masks_per_image`` are the read-time selection of spec §3.5, used by
    `PseudoLabelDataset` and the metrics, never by the generator.
    """

    out_dir: str = "data/pseudo"
    datasets: List[str] = field(default_factory=list)  # empty = every dataset with role unlabeled
    metrics: str = "metrics/pseudolabel.json"
    shard_size: int = 8  # images per shard: the unit of resuming and of Dask scheduling
    # Dask: a LocalCluster of n_workers processes, or the scheduler at scheduler_address;
    # n_workers = 0 runs the shards in this process, one after the other (debugging)
    scheduler_address: Optional[str] = None
    n_workers: int = 2
    threads_per_worker: int = 1  # Dask: shard tasks a worker runs at once
    torch_threads: int = 0  # torch intra-op threads of one shard task; 0 = threads_per_worker
    connect_timeout_s: float = 10.0
    # MaskGenerator (spec §3.3)
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    min_mask_region_area: int = 0
    decoder: str = "fast"
    decoder_batch: Optional[int] = None  # grid points decoded together; None = sized per device
    decoder_precision: str = "fp32"  # "bf16": the fast decoder's image-token work under bf16 autocast
    # read-time selection (spec §3.5)
    min_ratio: float = 100.0
    max_ratio: float = 0.95
    max_masks_per_image: int = 40


@dataclass
class RefineConfig:
    """The ``refine`` stage: training the mask-refinement module (spec §4.1, §13 A6)."""

    out: str = "models/refiner.ckpt"
    # the human-annotated sets the pairs come from (each in data.datasets; role labeled or refine)
    datasets: List[str] = field(default_factory=lambda: ["hq_train"])
    epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.1
    batch_size: int = 8  # pairs per optimiser step
    iou_filter: float = 0.7  # keep pairs with IoU(SAM, GT) >= this (App. D.2)
    pred_iou_thresh: float = 0.88  # AMG quality filters (App. D.2, spec §3.3)
    stability_thresh: float = 0.95
    stability_offset: float = 1.0
    points_per_mask: int = 2  # single-point prompts drawn per GT mask
    loss_size: int = 256  # loss resolution (padded frame side); 1024 = spec A10
    seed: int = 0
    val_fraction: float = 0.2
    patience: int = 2  # stop after this many epochs without a better val mIoU (0: never early)
    bf16: bool = False  # train under bf16 autocast (weights and optimiser stay fp32)
    max_images: int = 0  # images of the dataset used; 0 = all


@dataclass
class UncertaintyConfig:
    """The ``uncertainty`` stage (maps, spec §4.2) and its report (`sum.uncertainty.report`).

    ``hidden_gt`` is a glob relative to the parent of a dataset's image folder: the embedded
    world keeps the unlabeled pool's ground truth there for scoring only (never for training).
    """

    out_dir: str = "data/uncertainty"
    datasets: List[str] = field(default_factory=list)  # empty = every dataset with pseudo labels
    batch_size: int = 16  # pseudo labels refined per decoder call (one image at a time)
    store_refined: bool = True  # also store r (float16) beside u
    certainty_threshold: float = 0.6  # θ of spec §5.4: pixels with c <= θ count as uncertain
    metrics: str = "metrics/uncertainty.json"
    panel: str = "outputs/uncertainty/panel.png"
    n_panel_images: int = 4
    max_report_images: int = 0  # images scored per dataset; 0 = all
    hidden_gt: str = "hidden_gt/annotations_*.json"
    region_margin: float = 0.1  # scoring region: pseudo-label box ∪ matched-GT box, grown by this fraction of its side
    region_min_px: int = 8  # ... and by at least this many pixels
    min_match_iou: float = 0.5  # a pseudo label's best GT is its counterpart at this IoU (panoptic-quality rule)


# ---- paper Eq. 3 -----------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """Fine-tuning method (spec §9): which losses, sampling and task prompts are on."""

    name: str = "sum"
    use_unlabeled: bool = True
    use_uncertainty_loss: bool = True
    use_uncertainty_sampling: bool = True
    use_task_prompt: bool = True
    continuous_task_prompt: bool = False  # "SUM Continuous TP" ablation: task prompt in every round (§4.3)

    @property
    def uses_uncertainty(self) -> bool:
        """Whether the method reads uncertainty maps (for its loss or its click sampling, §5.3-5.4, §6)."""
        return self.use_uncertainty_loss or self.use_uncertainty_sampling


@dataclass
class TrainConfig:
    """Fine-tuning schedule (spec §7-8), scaled to the embedded CPU default. The paper's recipe:
    mode full, iterations 6000, batch_size 40, max_masks 30, loss_size 0, warmup_iters 250."""

    mode: str = "decoder"  # full | decoder (prompt encoder + mask decoder + task prompt; cached embeddings)
    iterations: int = 12
    lr: float = 1e-5
    task_prompt_lr_scale: float = 1.0  # lr multiplier of the task embeddings (see sum.train.optim)
    weight_decay: float = 0.1  # A2
    layer_decay: float = 0.8  # §8.1
    rounds: int = 7
    seed: int = 0
    batch_size: int = 2  # global images per step
    unlabeled_fraction: float = 0.5  # 1:1 labeled:unlabeled (A1)
    max_masks: int = 4  # per image
    loss_size: int = 256  # 0 = model img_size (spec A10); 256 = SAM's low-res frame, for CPU
    warmup_iters: int = 0  # A2 (SAM: 250)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0  # off
    box_probability: float = 0.5
    jitter: str = "sum_code"  # §6.1 D2: sum_code | sam_paper
    dice_threshold: float = 0.6  # θ, §5.4
    checkpoint_every: int = 50
    log_every: int = 1
    run_dir: str = "runs/finetune"  # resumable state
    model_dir: str = "models"  # <model_dir>/<method>.pt
    metrics_dir: str = "metrics/finetune"  # <metrics_dir>/<method>.json
    pseudo_dir: str = "data/pseudo"
    uncertainty_dir: str = "data/uncertainty"
    pseudo_min_ratio: float = 100.0  # §3.5
    pseudo_max_ratio: float = 0.95
    # autocast of the forward (spec A2: bf16): auto = bf16 on CUDA, and on CPUs with native bf16
    # (avx512_bf16 / AMX) in decoder mode; bf16 | fp32 force it. Losses are fp32 either way.
    precision: str = "auto"
    # processes decoding the next steps' images (sum.train.loader): 0 = on the main thread, null =
    # min(2, CPUs - 1); pinned memory on CUDA. The batches are the same either way.
    loader_workers: Optional[int] = None


@dataclass
class RecipeConfig:
    """``sumseg recipe`` (`sum.eval.recipe.choose_recipe`): ``train.lr``, ``train.iterations`` and
    ``train.task_prompt_lr_scale`` (spec §8) chosen on the datasets of role ``validation`` alone,
    by the rule written in params/recipe/default.yaml before any result. Run by hand (no DVC stage)."""

    lrs: List[float] = field(default_factory=lambda: [1e-5, 5e-5, 1e-4])  # spec §8.1: 1e-5; 5e-5, 1e-4 for fewer steps
    iterations: List[int] = field(default_factory=lambda: [20, 40, 80])  # checkpoints of one run per lr
    task_prompt_lr_scales: List[float] = field(default_factory=lambda: [1.0, 10.0, 100.0])
    method: str = "vanilla"  # lr and iterations are chosen on this method (the plain recipe)
    task_prompt_method: str = "sum"  # then the task-prompt lr scale on this one
    datasets: List[str] = field(default_factory=list)  # role validation each; empty = every one of that role
    clicks: List[int] = field(default_factory=lambda: [1, 3, 5])  # score: mean point-protocol mIoU after these
    tie: float = 0.002  # scores within this of the best tie: the smaller lr, then fewer steps (smaller scale)
    max_images: int = 0  # per validation dataset; 0 = all
    max_masks_per_image: int = 6  # targets per image (as eval.max_masks_per_image); 0 = all
    out_dir: str = "outputs/recipe"  # runs/, models/, finetune/ of the candidates, scores.json
    metrics: str = "metrics/recipe.json"


@dataclass
class TrackingConfig:
    """MLflow: the tracking URI from here, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""

    enabled: bool = True
    uri: Optional[str] = None
    experiment: str = "sum"
    system_metrics: bool = True


@dataclass
class DemoConfig:
    """The first look at the model: 1-click masks on a few benchmark images (``sumseg demo``)."""

    datasets: List[str] = field(default_factory=list)  # names in data.datasets; empty = all benchmarks
    max_images: int = 2  # per dataset
    max_masks: int = 6  # per image, largest first
    out_dir: str = "outputs/demo"
    metrics: str = "metrics/demo.json"


@dataclass
class EvalConfig:
    """Benchmark evaluation (spec §10; ``sumseg evaluate``, `sum.eval.evaluate.run_evaluate`).

    ``models`` maps a column name to a checkpoint: "" is ``model`` itself (the foundation
    checkpoint), a path a SUM checkpoint of ``finetune`` (the method stored in its meta decides
    the task prompt, spec §13 A3) or a plain SAM state dict. Its default lives in params/eval/default.yaml
    (foundation, hq_only, vanilla, sum) and not here, so that ``~eval.models.<name>`` can drop a
    model (a schema default would be merged back in). The caps and ``box_rounds`` keep the
    embedded default within about 4 minutes on 2 CPU cores; 0 caps mean the paper's protocol.
    """

    models: Dict[str, str] = field(default_factory=dict)  # name -> checkpoint; see params/eval/default.yaml
    datasets: List[str] = field(default_factory=list)  # names in data.datasets; empty = every benchmark
    protocols: List[str] = field(default_factory=lambda: ["point", "box", "boundary"])  # spec §10.3
    rounds: int = 6  # point protocol: clicks reported as mIoU, prompts accumulating (spec §10.3)
    noc_max_clicks: int = 0  # point protocol: clicks simulated for NoC@85/90/95 and NoF@95 (RITM: 20); 0 = rounds
    box_rounds: int = 1  # box protocol: the tight box, then box_rounds - 1 clicks (paper: 6)
    selection: str = "oracle"  # oracle (best of 3 outputs for a single prompt) | token0 (one output) | predicted_iou
    predicted_iou: List[str] = field(default_factory=list)  # protocols with <model>@piou (predicted-IoU pick)
    task_prompt_zero: List[str] = field(default_factory=lambda: ["point"])  # protocols with <model>@tp0 (A3)
    max_images: int = 0  # per benchmark, first in dataset order; 0 = all
    max_masks_per_image: int = 6  # non-empty masks drawn per image, seeded by the image id; 0 = all
    target_seed: int = 0  # seed of that draw (sum.eval.protocol.select_targets)
    min_images: int = 2  # benchmarks with fewer images are examples: listed apart, outside task and overall means
    boundary_width: int = 10  # px band of the boundary protocol's click (spec §10.3)
    decoder: str = "fast"  # fast (folded, ~2x) | exact (SAM's MaskDecoder); see sum.eval.evaluate
    precision: str = "fp32"  # decoder autocast: fp32 | bf16 (1.4x faster on CPU, moves benchmark means by up to 0.05)
    threads: int = 0  # torch intra-op threads during the run (restored after); 0 = leave torch's setting
    n_panels: int = 2  # images per benchmark in outputs/eval/panels/<benchmark>.png
    reference: str = ""  # the model the others are compared with (table.md, deltas.csv); "" = the first of models
    bootstrap: int = 1000  # image-bootstrap redraws of the interval of each difference; 0 = no comparison
    ci_level: float = 0.95  # coverage of that interval
    metrics: str = "metrics/eval.json"
    plots_dir: str = "plots/eval"
    out_dir: str = "outputs/eval"
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class SeedsConfig:
    """``sumseg seeds`` (`sum.eval.seeds.run_seeds`): every method fine-tuned with each seed, one
    evaluation of them all with the foundation model (on ``eval``'s benchmarks and settings), and
    the table of mean ± sd over seeds with the seed-averaged differences and their image-bootstrap
    intervals. Run by hand (no DVC stage: it does not fit the default's budget)."""

    # params/method/<name>.yaml each
    methods: List[str] = field(default_factory=lambda: ["hq_only", "vanilla", "sum", "sum_no_uncertainty"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # train.seed of each run
    against_foundation: bool = True  # compare every method with the foundation model
    # "<method> vs <method>": the first minus the second, both seed-averaged
    comparisons: List[str] = field(default_factory=lambda: ["sum vs sum_no_uncertainty", "sum vs vanilla"])
    protocols: List[str] = field(default_factory=lambda: ["point", "box"])  # evaluated (eval.protocols of the run)
    rounds: List[int] = field(default_factory=lambda: [1, 3, 5])  # rows: mIoU after these rounds (those a protocol has)
    bootstrap: int = 1000  # image-bootstrap redraws of each difference's interval
    ci_level: float = 0.95  # coverage of that interval
    out_dir: str = "outputs/seeds"  # models/<method>_s<seed>.pt, eval/, table.md
    metrics: str = "metrics/seeds.json"
    # label -> uncertainty folder: the method "<m>@<label>" is <m> fine-tuned with
    # train.uncertainty_dir=<folder> (the dose-response, params/seeds/dose.yaml)
    uncertainty_variants: Dict[str, str] = field(default_factory=dict)


@dataclass
class RegistryConfig:
    """The ``register`` stage (`sum.registry.register`): which fine-tuned methods go to the MLflow
    model registry, and the no-forgetting gate that gives the ``champion`` alias
    (`sum.registry.gate`)."""

    methods: List[str] = field(default_factory=lambda: ["sum"])  # <train.model_dir>/<method>.pt each
    model_name: str = ""  # registered model; "" = sum-<model.name> (one per foundation backbone)
    protocol: str = "point"  # the evaluation protocol the gate reads
    metric: str = "miou"  # miou | mbiou
    headline_rounds: List[int] = field(default_factory=lambda: [1, 3])  # headline: mean over tasks of these rounds
    gate_rounds: List[int] = field(default_factory=list)  # forgetting checked after these rounds; empty = all reported
    tolerance: float = 1.0  # points below the foundation model a task may lose
    out: str = "metrics/register.json"
    embedding_cache_size: int = 4  # images whose embeddings the served model keeps


@dataclass
class FlowConfig:
    """The Prefect flow over the DVC stages (``flows/pipeline.py``): how long a stage may run and
    which steps retry. Read by the flow, never by a stage, so no DVC stage depends on it."""

    timeout_s: Dict[str, int] = field(default_factory=dict)  # stage (or foreach group) -> seconds
    default_timeout_s: int = 7200  # stages not named in timeout_s
    retry_stages: List[str] = field(default_factory=lambda: ["acquire"])  # flaky I/O: downloads
    retries: int = 3  # for retry_stages and dvc push / pull
    retry_delay_s: float = 10.0  # first back-off; doubles on each retry


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
