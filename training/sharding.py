"""Which engine spreads a training run over processes: DDP (every process holds every weight), FSDP2 (the frozen LM
sharded across processes, each decoder layer its own unit) or DeepSpeed ZeRO-3; and the full <-> sharded tensor
conversions that keep checkpoints in one format whatever the engine.

Why FSDP2 (`torch.distributed.fsdp.fully_shard`, accelerate's `fsdp_version: 2`) and not FSDP1: FSDP2 keeps every
parameter a `DTensor` under its own name, accepts frozen and trainable parameters of different dtypes in one unit
(only the trainable ones must share a dtype: a bf16 decoder layer may carry an fp32 LoRA adapter), and needs no
`use_orig_params`. FSDP1 flattens each unit into one buffer of one dtype.

The learned parts (`gill`: `[IMG]` rows, projections, mapper, decision head) stay whole on every process, as with
DDP, and only their gradients are averaged (`average_replicated_gradients`, one all-reduce per optimizer step, as
DDP does). Why not shard them with the root unit: they are small (50-70M values, 0.75-1.04 GiB with AdamW from
OPT-6.7B to Llama-3-70B: benchmarks/results/training_memory.md), the LM reads them outside their own forward (the
`[IMG]` input rows, the LM-head hook), which sharded tensors only allow inside the unit's forward, `fully_shard`
refuses scalar parameters (`logit_scale`), and whole tensors keep everything that touches them (`[IMG]`-row
rescaling, logging, export) as it is.
A LoRA adapter lives inside the decoder layers and is sharded with them (FSDP2 keeps every parameter a DTensor under
its own name). Checkpoints gather it and its optimizer moments to full tensors, in the format a DDP run writes (same
files, names and shapes; resuming across engines is not tested).
"""

import importlib.util
import logging
import os
import warnings

import torch

from training.params import SHARDING

logger = logging.getLogger(__name__)

FSDP_CONFIG = "training/configs/fsdp.yaml"
DEEPSPEED_CONFIG = "training/configs/deepspeed_zero3.json"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launcher_engine() -> str:
    """What `accelerate launch --config_file ...` asked for (through its environment): 'fsdp', 'deepspeed' or 'ddp'."""
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"


def world_size() -> int:
    """The number of processes of this job, as torchrun / `accelerate launch` set it (1 when started plainly)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"The environment variable WORLD_SIZE must be an integer, got {value!r}.") from None


def resolve_sharding(sharding: str, deepspeed_config: str | None = None) -> str:
    """The engine this run uses ('ddp', 'fsdp' or 'deepspeed'), checked against the launcher, the process count and
    what is installed; raises `ValueError` naming `sharding` before any model loads."""
    if sharding not in SHARDING:
        raise ValueError(f"`sharding` must be one of {SHARDING}, got {sharding!r}.")
    launched = launcher_engine()
    engine = launched if sharding == "auto" else sharding
    if launched != "ddp" and engine != launched:
        raise ValueError(
            f"`sharding`={sharding!r}, but the launcher's accelerate config asks for {launched} "
            f"(ACCELERATE_USE_{launched.upper()}=true): drop `--sharding` or set `--sharding {launched}`, or launch "
            "with a config that does not select it."
        )
    processes = world_size()
    if engine == "fsdp":
        if processes < 2:
            raise ValueError(
                f"`sharding`={sharding!r} shards the frozen LM across processes, but this run has {processes} process "
                f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}). Start it with `accelerate launch --config_file "
                f"{FSDP_CONFIG} --num_processes N -m training.train_gill ...` (N >= 2), or train on one device with "
                "`sharding: auto` (the default) or `ddp`."
            )
        if launched == "fsdp" and os.environ.get("FSDP_IGNORED_MODULES"):
            raise ValueError(
                f"`sharding`={sharding!r}: the launcher's FSDP config sets `fsdp_ignored_modules`="
                f"{os.environ['FSDP_IGNORED_MODULES']!r}; GILL's training sets it itself (the learned parts stay whole "
                "on every process): remove it from the accelerate config."
            )
        version = os.environ.get("FSDP_VERSION")
        if launched == "fsdp" and version not in (None, "2"):
            raise ValueError(
                f"`sharding`={sharding!r}: the launcher's accelerate config asks for FSDP version {version!r}; GILL's "
                f"training supports FSDP2 only (`fsdp_version: 2`, as in {FSDP_CONFIG})."
            )
    if engine == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                f"`sharding`={sharding!r} needs the `deepspeed` package, which is not installed (`pip install "
                "deepspeed` on a machine with CUDA); or use `sharding: fsdp`."
            )
        if not torch.cuda.is_available():
            raise ValueError(f"`sharding`={sharding!r}: DeepSpeed ZeRO-3 needs CUDA devices; none is available here.")
        if launched != "deepspeed" and deepspeed_config is None:
            raise ValueError(
                f"`sharding`={sharding!r} without an accelerate DeepSpeed launch config needs `deepspeed_config` "
                f"(e.g. {DEEPSPEED_CONFIG}); got None."
            )
    if deepspeed_config is not None and engine != "deepspeed":
        raise ValueError(
            f"`deepspeed_config`={deepspeed_config!r} is only read with `sharding: deepspeed`, but this run uses {engine}."
        )
    return engine


def fsdp_mixed_precision():
    """Parameters keep their own dtype (frozen LM bf16 via `frozen_dtype`, learned parts and LoRA fp32; autocast
    computes as with DDP) and gradients are reduced in fp32, as DDP reduces them. accelerate's default for
    `mixed_precision: bf16` would compute and reduce the fp32 adapter in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(reduce_dtype=torch.float32)


def engine_kwargs(engine: str, deepspeed_config: str | None = None) -> dict:
    """`Accelerator(**kwargs)` for the engine: our FSDP2 plugin unless the launcher configured one."""
    if engine == "fsdp" and launcher_engine() != "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        # Each decoder layer its own unit: the layer classes come from the model (`GILLTrainingModel._no_split_modules`).
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
            mixed_precision_policy=fsdp_mixed_precision(),
        )
        return {"fsdp_plugin": plugin}
    if engine == "deepspeed" and launcher_engine() != "deepspeed":
        from accelerate import DeepSpeedPlugin

        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config)}
    return {}


def quiet_view_warning() -> None:
    """FSDP2 warns, at every forward of every layer, that a decoder layer returned a view (OPT's layers do): an
    in-place op on it would skip FSDP's pre-backward hook. transformers' decoder loops use the output out of place,
    and the FSDP-vs-DDP test (same losses, same LoRA and learned weights) checks the gradients, so it is silenced."""
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def enable_fsdp_on_cpu(accelerator, plugin=None) -> None:
    """Runs accelerate's own FSDP2 path on a gloo group of CPU processes (tests, and this machine's checks).

    accelerate 1.16 selects FSDP only on accelerators (`AcceleratorState` switches MULTI_GPU/XPU/... to FSDP, never
    MULTI_CPU), while torch's `fully_shard` runs on CPU tensors and gloo. So on a CPU group the state is switched
    to FSDP here, with the plugin given to `Accelerator` (`plugin`; None: the launcher's, read from its FSDP_*
    environment): `prepare` then runs `fsdp2_prepare_model` as on GPUs.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"FSDP was asked for, but accelerate set up {state.distributed_type} for this run.")
    if plugin is None:
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment (FSDP_* variables)
    state.fsdp_plugin = plugin
    # Both shared states: every `AcceleratorState()` built later copies PartialState's fields over its own.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP


def keep_learned_parts_whole(accelerator, learned) -> list[torch.nn.Parameter]:
    """Under FSDP, tells accelerate to leave `learned` out of the sharding (`ignored_modules`); returns its trainable
    parameters, whose gradients `average_replicated_gradients` averages (empty list: nothing to do, DDP or one
    process)."""
    if not getattr(accelerator, "is_fsdp2", False):
        return []
    plugin = accelerator.state.fsdp_plugin
    if plugin.ignored_modules not in (None, [], ()):
        raise ValueError(
            f"The FSDP config's `ignored_modules`={plugin.ignored_modules!r}: GILL's training sets it itself (the learned "
            "parts stay whole on every process); remove it from the accelerate config."
        )
    plugin.ignored_modules = [learned]
    return [p for p in learned.parameters() if p.requires_grad]


def average_replicated_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """The mean over processes of the gradients of parameters FSDP does not manage, as DDP computes it (each process
    divides by the process count, then all processes sum; with 2 processes the same bits as DDP). One flat
    all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or accelerator.num_processes == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) / accelerator.num_processes
    torch.distributed.all_reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def configure_deepspeed(accelerator, micro_batch: int, accumulation: int) -> None:
    """Fills the batch sizes of a DeepSpeed config left at "auto": accelerate resolves them from a prepared
    DataLoader, and this training builds its own loaders per epoch (never prepared)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * accelerator.num_processes


def lm_sharded(accelerator) -> bool:
    """Whether this run shards the LM across processes (FSDP, DeepSpeed): every process must then run the same
    sequence of LM forwards, as each one gathers the layers' shards."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def lm_values_per_process(accelerator, llm) -> tuple[list[int], int]:
    """How many of the LM's values each process stores (a list, one per process), and the LM's total."""
    from accelerate.utils import gather_object

    counts = [sum(local_numel(p) for p in llm.parameters())]
    if accelerator.num_processes > 1:
        counts = gather_object(counts)
    total = sum(p.numel() for p in llm.parameters())  # a DTensor's numel is the whole tensor's
    if accelerator.is_main_process:
        engine = "FSDP2" if getattr(accelerator, "is_fsdp2", False) else str(accelerator.distributed_type)
        logger.info("LM values held per process: %s of %d (%s).", counts, total, engine)
    return counts, total


def export_learned_parts(accelerator, pipe, output_dir: str, gill_dir: str, export_pipeline: bool) -> None:
    """FSDP's export: the learned parts (`gill_dir`, whole on every process) and a LoRA adapter (`llm_lora/`,
    gathered), in the formats an unsharded run exports. The whole pipeline is not written: its frozen LM is sharded
    across processes (gathering a 70B LM into one process is what sharding avoids) and unchanged: load the pipeline
    the run started from and put these in (docs/training.md)."""
    from gill_pipeline.constants import LORA_FOLDER

    lora_state = {name: full_tensor(p.detach()) for name, p in pipe.llm.named_parameters() if p.requires_grad}
    if accelerator.is_main_process:
        pipe.gill.eval()
        pipe.gill.save_pretrained(os.path.join(output_dir, gill_dir))
        if lora_state:
            pipe.llm.save_pretrained(os.path.join(output_dir, LORA_FOLDER), state_dict=lora_state)
        if export_pipeline:
            logger.warning(
                "`export_pipeline`: with FSDP the frozen LM is sharded, so only the learned parts were exported (%s%s); "
                "load the pipeline the run started from and set its `gill` module (and LoRA adapter) from them.",
                os.path.join(output_dir, gill_dir), f" and {LORA_FOLDER}/" if lora_state else "",
            )
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------------------
# Full tensors <-> this process's shard
# --------------------------------------------------------------------------------------------------------------------
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is all-gathered (a collective: every process must call it, in the same order)."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    return tensor


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: for a DTensor, this process's shard of it (no communication: every process holds
    `full`); otherwise `full` itself on `like`'s device."""
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements, src_data_rank=None
        )
    return full.to(device=like.device)


def local_numel(tensor: torch.Tensor) -> int:
    """How many values of `tensor` this process stores."""
    return tensor.to_local().numel() if is_sharded(tensor) else tensor.numel()


def full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded moment gathered: the format a DDP run saves."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: full_tensor(value) if torch.is_tensor(value) else value for key, value in entry.items()}
        for index, entry in sorted(state["state"].items())
    }
    return state


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A full optimizer state (as saved) laid out like the optimizer's (possibly sharded) parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shaped = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        shaped[index] = {
            # Adam's `step` stays a plain scalar, even beside a scalar parameter (`logit_scale`).
            key: local_part(value, param) if key != "step" and torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    return {**state, "state": shaped}
