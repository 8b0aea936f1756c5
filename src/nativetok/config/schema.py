"""The typed schema of an experiment: every key a YAML file or a `key=value` override may set.

OmegaConf checks types and unknown keys against these dataclasses; `check_values` in `checks.py` checks
the values that types cannot (every float finite, ranges, choices, consistency between sections).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, get_args

# Every value a choice key accepts, named once: `check_values`, the models' registries and the CLI import
# these. The dataclass fields below stay `str` (OmegaConf's structured configs have no Literal type).
TokenizerKind = Literal["nativetok", "parallel", "causal_mask"]
GeneratorKind = Literal["ar", "maskgit"]
MaskSchedule = Literal["cosine", "arccos", "linear"]
GuidanceSchedule = Literal["constant", "linear"]
GrowthInit = Literal["copy_last", "fresh"]
TokenOrder = Literal["forward", "reversed", "permuted"]
PixelLoss = Literal["l1", "l2"]
TrainablePart = Literal["all", "mit", "old_experts", "codebook", "decoder"]
Precision = Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"]
Strategy = Literal["auto", "ddp"]  # what `build_trainer` sets up and tests/test_distributed.py runs
LoggerKind = Literal["tensorboard", "csv", "wandb"]
ProfilerKind = Literal["simple", "advanced"]
WandbMode = Literal["online", "offline"]


def choices(kind: Any) -> Tuple[str, ...]:
    """The values of a Literal above, in order."""
    return get_args(kind)


TOKENIZER_KINDS = choices(TokenizerKind)
GENERATOR_KINDS = choices(GeneratorKind)
MASK_SCHEDULES = choices(MaskSchedule)
GUIDANCE_SCHEDULES = choices(GuidanceSchedule)
GROWTH_INITS = choices(GrowthInit)
TOKEN_ORDERS = choices(TokenOrder)
PIXEL_LOSSES = choices(PixelLoss)
TRAINABLE_PARTS = choices(TrainablePart)
PRECISIONS = choices(Precision)
STRATEGIES = choices(Strategy)
LOGGERS = choices(LoggerKind)
PROFILERS = (None, *choices(ProfilerKind))
WANDB_MODES = (None, *choices(WandbMode))


@dataclass
class RunConfig:
    name: str = "run"
    # Outputs (resolved config, checkpoints, TensorBoard logs, pictures) go here.
    dir: str = "runs/${run.name}"
    # auto: continue from <dir>/checkpoints/last.ckpt when it exists; never: refuse a folder that has
    # checkpoints; or a path to a checkpoint file.
    resume: str = "auto"


@dataclass
class DataConfig:
    # JSON index written by `nativetok shard`: shard names, sample counts, classes, image size.
    index: str = "data/fmnist/index.json"
    # Brace patterns that replace the index's shard lists, e.g. "data/in/imagenet-train-{000000..000127}.tar".
    train_shards: Optional[str] = None
    val_shards: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 32
    channels: int = 1
    num_classes: int = 10
    # Global batch size over all devices and nodes; the per-device batch size is derived from it.
    batch_size: int = 64
    val_batch_size: Optional[int] = None
    num_workers: int = 2
    shuffle_buffer: int = 2000
    # Samples that make one training epoch (all ranks together); null: the size of the training split.
    train_samples_per_epoch: Optional[int] = None
    # At most this many validation samples (null: the whole split, each sample exactly once).
    val_samples: Optional[int] = None
    hflip: bool = True
    # A corrupt shard or an undecodable sample is skipped and counted, or stops the run when strict.
    strict: bool = False
    # Run `pipe:` commands named by train_shards, val_shards or index (a shell command per shard). Only from
    # your experiment file or command line: a checkpoint's or export's stored config never enables it, and an
    # index.json never names a command.
    allow_pipes: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 2000
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    val_every_n_steps: int = 500
    log_every_n_steps: int = 50
    # Reconstruction / sample grids to TensorBoard every N steps (0: only at the end).
    images_every_n_steps: int = 500
    # true, false, or auto: a bar on a terminal outside a SLURM batch job; without one, a log line every
    # log_every_n_steps (step, images/s, losses, lr, HNT stage, ETA) instead of a bar's redraws.
    progress_bar: Any = "auto"
    # last.ckpt every N steps (and at the end, and on SIGUSR1/SIGTERM); the one before is previous.ckpt.
    checkpoint_every_n_steps: int = 500
    # A non-finite loss skips its step; this many in a row stop the run.
    max_nonfinite_steps: int = 10
    compile: bool = False
    # Stage 1: stop once validation PSNR gains less than this many dB over the last 20% of the steps (the
    # plateau check of docs/study.md, applied at each validation from plateau_min_steps on); max_steps stays
    # the cap. null: train for max_steps.
    plateau_min_gain_db: Optional[float] = None
    plateau_min_steps: int = 0
    # The check must pass at this many validations in a row: with 1, a single PSNR dip or slow stretch at a
    # constant learning rate stops a run that is still improving (PRESET=plateau: two of six runs, README).
    plateau_patience: int = 1
    # Stage 1 on a CUDA device: replay the encoder (MIT, experts, quantizer) forward and backward as CUDA
    # graphs, captured once per growth stage; it removes the host's per-op cost of the sequential experts.
    # true (refused where it cannot act), false, or auto: wherever it can act (what the GPU presets use, which
    # serve both stages; elsewhere the step runs eager).
    cuda_graphs: Any = False
    deterministic: bool = False
    # Where scalars go, in the run folder: tensorboard (tb/), csv (csv/metrics.csv) or wandb (needs the wandb
    # package; image grids go to TensorBoard only, and are always written as PNGs in the run folder).
    logger: str = "tensorboard"
    # wandb: the project, and online or offline (null: the WANDB_MODE environment variable, else online).
    wandb_project: str = "nativetok"
    wandb_mode: Optional[str] = None
    # Lightning's debugging flags. fast_dev_run: true or N runs N training and validation batches with no
    # checkpoint, resume, logger or config.yaml written (a check that the run starts, not a run).
    fast_dev_run: Any = False
    # Validation batches per validation: a count, or a fraction of the split (0: no validation).
    limit_val_batches: Any = 1.0
    # Stage 2 only: gradients of N batches per optimizer step (N x data.batch_size images per step).
    accumulate_grad_batches: int = 1
    # null, simple or advanced: a profile of the run written to <run.dir>/fit-profile.txt.
    profiler: Optional[str] = None


@dataclass
class TransformerConfig:
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class ExpertsConfig:
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class QuantizerConfig:
    codebook_size: int = 4096
    code_dim: int = 12
    commitment: float = 0.25
    # Codes unused for this many steps are moved onto recent encoder outputs (0: never).
    restart_dead_after: int = 0


@dataclass
class DecoderConfig(TransformerConfig):
    # Probability that a training sample is decoded from a random prefix of its tokens.
    random_prefix: float = 0.0


@dataclass
class TokenizerConfig:
    # nativetok: MIT + Mixture of Causal Experts; parallel: TiTok-style latent tokens inside the MIT;
    # causal_mask: latent tokens inside the MIT with a causal mask among them.
    kind: str = "nativetok"
    patch_size: int = 4
    num_tokens: int = 16
    mit: TransformerConfig = field(default_factory=TransformerConfig)
    # Width of the MIT's dimension switcher output Z: the width of every expert.
    latent_width: int = 256
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class PerceptualConfig:
    # LPIPS-VGG: torchvision's vgg16-397923af.pth, downloaded by hand (data/README.md), needed when
    # loss.perceptual_weight > 0; LPIPS' v0.1 linear heads (vgg.pth), unset: the copy the lpips package ships.
    vgg_weights: Optional[str] = None
    lin_weights: Optional[str] = None


@dataclass
class DiscriminatorConfig:
    channels: int = 64
    layers: int = 3


@dataclass
class LossConfig:
    pixel: str = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    quantizer_weight: float = 1.0
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_adaptive: bool = True
    lecam_weight: float = 0.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    # Scale lr by (global batch size / base_batch_size) when set: the linear scaling rule.
    base_batch_size: Optional[int] = None
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    disc_lr: float = 1e-4
    # Exponential moving average of the weights, used for evaluation (0: off).
    ema_decay: float = 0.0


@dataclass
class GrowthStage:
    # Global step at which the stage begins (the first stage begins at 0).
    step: int = 0
    # Experts active from this step on; each stage may only keep or grow the count.
    experts: int = 1
    # What trains besides experts new in this stage: any of all, mit, old_experts, codebook, decoder.
    train: List[str] = field(default_factory=lambda: ["all"])


@dataclass
class GrowthConfig:
    # Hierarchical Native Training; with no stages every expert is active and trained from the start.
    stages: List[GrowthStage] = field(default_factory=list)
    # A new expert starts as a copy of the last active one, or from fresh initialisation.
    init: str = "copy_last"
    # Memory (GiB, on the training device, per rank) for Z and the frozen experts' outputs per image view
    # while the MIT is frozen; a step reuses them for views seen before in the stage. 0: off.
    cache_gib: float = 0.0
    # A stage that trains the MIT or the codebook while earlier experts are frozen changes those experts'
    # tokens (their inputs or their codes move), so the config check refuses it unless this is true.
    allow_moving_frozen_tokens: bool = False


@dataclass
class GeneratorConfig:
    # ar: autoregressive (LlamaGen-style); maskgit: bidirectional, iterative parallel decoding.
    kind: str = "ar"
    # The stage-1 checkpoint that made the tokens: it decodes samples, and gives the two sizes below.
    tokenizer: str = "runs/fmnist_tiny/checkpoints/last.ckpt"
    # The tokenizer's codebook size and token count: left out (null), they are read from generator.tokenizer
    # when training starts (`checkpoints.with_tokenizer_sizes`); given, the tokenizer must have them.
    codebook_size: Optional[int] = None
    num_tokens: Optional[int] = None
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # Probability of training with the null class (what classifier-free guidance needs).
    class_dropout: float = 0.1
    mask_schedule: str = "cosine"  # maskgit: cosine, arccos or linear
    # The order in which the generator sees each token sequence: forward (the tokenizer's), reversed, or one
    # fixed random permutation drawn with order_seed. Samples come back in the tokenizer's order; the order
    # controls of `nativetok compare` (same tokens, same decoder, only the order differs) use it.
    token_order: str = "forward"
    order_seed: int = 0


@dataclass
class SamplingConfig:
    cfg_scale: float = 2.0
    # constant, or linear: rising from 1 at the first token to cfg_scale at the last.
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    steps: int = 8  # maskgit decoding steps
    choice_temperature: float = 4.5  # maskgit: Gumbel noise on confidences, annealed to 0
    # Samples per class in the grids logged during training.
    grid_per_class: int = 8


@dataclass
class EvaluationConfig:
    # Images per FID/KID: samples for gFID, reconstructions for rFID (papers: 50,000 on ImageNet).
    images: int = 5000
    # gFID's reference: a seeded, class-balanced subset of this many training images; 0: the whole split.
    reference_images: int = 10000


@dataclass
class CallbackConfig:
    """A Lightning callback added to the trainer, in Lightning CLI's format. Honoured only from the user's own
    experiment file or command line: checkpoints and exports never store or restore it (it names code to import)."""

    # The dotted path of a pytorch_lightning.Callback subclass, e.g. pytorch_lightning.callbacks.LearningRateMonitor.
    class_path: str = ""
    # Keyword arguments of its constructor, checked against its signature before the run starts.
    init_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    # tokenizer: stage 1 (uses tokenizer, loss, growth); generator: stage 2 (uses generator, sampling).
    # The other stage's sections are in every config but never read (UNUSED_SECTIONS).
    stage: str = "tokenizer"
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    # Extra Lightning callbacks, appended to the trainer's own (`trainer.callbacks` is read as this too).
    callbacks: List[CallbackConfig] = field(default_factory=list)


# The sections of ExperimentConfig a stage never reads: changing them neither stops a resume nor invalidates a
# finished study cell.
UNUSED_SECTIONS = {"tokenizer": ("generator", "sampling"), "generator": ("tokenizer", "loss", "growth")}


@dataclass
class StudyArm:
    """One arm of `nativetok compare`: which tokenizer's tokens, in which order, the generator learns."""

    # A key of the preset's `tokenizers`; arms naming the same one share its run and its token shards.
    tokenizer: str = "nativetok"
    # generator.token_order: forward, reversed or permuted (with the preset's order_seed).
    order: str = "forward"


@dataclass
class ComparePreset:
    """`nativetok compare`: the token-order study of docs/study.md: tokenizers, arms, seeds and measurements."""

    # Paths relative to the preset file.
    tokenizer_experiment: str = "../fmnist_tiny.yaml"
    generator_experiment: str = "../fmnist_tiny_ar.yaml"
    # Seed s gives every arm the same tokenizer initialisation and data order, generator initialisation and
    # data order, and sampling seed: differences are paired by seed.
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # key=value overrides for every tokenizer and every generator.
    tokenizer: List[str] = field(default_factory=list)
    generator: List[str] = field(default_factory=list)
    # Tokenizer name -> its own overrides.
    tokenizers: Dict[str, List[str]] = field(default_factory=dict)
    # Tokenizer name -> the tokenizer whose parameter count it matches by its MIT depth.
    match_parameters: Dict[str, str] = field(default_factory=dict)
    # Arm name -> tokenizer and order. The decision rule reads the arms nativetok, parallel, reversed, permuted.
    arms: Dict[str, StudyArm] = field(default_factory=dict)
    # [arm, other arm] pairs reported besides the rule's, as paired differences (first minus second) of the arms'
    # primary metric and bits/token and of their tokenizers' PSNR, adjacent repeats and distinct ids.
    paired: List[List[str]] = field(default_factory=list)
    # The one fixed permutation of the `permuted` order, the same for every seed.
    order_seed: int = 1234
    # Class-balanced subsets, drawn once with subset_seed: training images the generators learn from; the
    # test split halved into a selection half (generator validation NLL, checkpoint choice, token statistics)
    # and an evaluation half (the references of every FD).
    subset_seed: int = 0
    generator_images: int = 30000
    selection_images: int = 5000
    evaluation_images: int = 5000
    # Generated images per arm and seed (class-balanced).
    samples: int = 5000
    # Inception FID of the samples against the evaluation half on this many images (0: not measured).
    inception_images: int = 0


@dataclass
class AblationPreset:
    """`nativetok ablate`: tokenizer variants of one experiment, each trained with every seed and measured
    by the PSNR of reconstructions from prefixes of its tokens."""

    # Path relative to the preset file.
    experiment: str = "../fmnist_tiny.yaml"
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    # Validation images for the prefix PSNR.
    images: int = 2000
    # key=value overrides for every variant, then each variant's own.
    common: List[str] = field(default_factory=list)
    variants: Dict[str, List[str]] = field(default_factory=dict)
    # The variant every other one is compared with.
    reference: str = ""

