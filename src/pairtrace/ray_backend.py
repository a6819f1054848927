"""Datapoint-vector extraction on a Ray cluster through Ray Data (``--backend ray``).

The driver reads the pairs once, as the local extraction does: it writes ``manifest.json`` and ``pairs.parquet``
into the store directory, and stages each store shard's pairs as a small Parquet file under
``<store>/.staging/``. Ray Data then maps the missing shard indices over a pool of actors
(:class:`ray.data.ActorPoolStrategy`), each of which loads the model once (one GPU each with
``num_gpus_per_worker=1``) and writes whole shards with the same code and the same atomic writes as the local
path. The result is the same store, shards and manifest, as :func:`pairtrace.vectors.compute_datapoint_vectors`;
an interrupted run resumes from the shards on disk. Ray schedules, retries and places the work; pairtrace adds
no scheduler of its own.

The store directory must be on a filesystem that every Ray node sees (the staging files and shards go there), and
pairtrace must be importable on every node (install it, or pass a ``runtime_env``). Ray is an optional
dependency: ``pip install "ray[data]"``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pairtrace.data.types import Pair, PairSet
from pairtrace.errors import ConfigError, DataError, ManifestMismatchError
from pairtrace.models import DTYPES, LoadedModel, ModelSpec
from pairtrace.pooling import ResponsePooling
from pairtrace.records import atomic_path
from pairtrace.shard import PairSource, as_pair_source
from pairtrace.shared_prompt import DEFAULT_MIN_PROMPT_FRACTION
from pairtrace.store import STORE_DTYPES, Manifest, VectorStore, check_compatible, shard_path, write_shard

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
STAGING_PATTERN = "pairs-{:05d}.parquet"
_STAGING_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("row", pa.int64()),
        ("prompt", pa.string()),  # JSON list of {role, content}
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
    ]
)


def ray_available() -> bool:
    """Whether Ray Data can be imported."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RayOptions:
    """Where and how the Ray workers run."""

    num_workers: int = field(default=2, metadata={"help": "Actors in the pool (each loads the model once)."})
    num_gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs per actor (1 for one GPU each)."})
    num_cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per actor (torch threads follow it)."})
    address: str | None = field(
        default=None, metadata={"help": "Ray cluster address for ray.init (None: the running or a local cluster)."}
    )
    init_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra ray.init arguments, used only when Ray is not running yet."}
    )
    runtime_env: dict[str, Any] | None = field(
        default=None, metadata={"help": "Ray runtime_env for the actors (e.g. to install pairtrace on the nodes)."}
    )
    keep_staging: bool = field(default=False, metadata={"help": "Keep the staged pair files after a full run."})

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"RayOptions field 'num_workers' must be at least 1, got {self.num_workers}")


def staging_path(out_dir: str | Path, index: int) -> Path:
    """Staged pairs of store shard ``index``."""
    return Path(out_dir) / STAGING_DIR / STAGING_PATTERN.format(index)


def _write_staging(path: Path, pairs: Sequence[Pair]) -> None:
    columns = {
        "id": [p.id for p in pairs],
        "row": [p.row for p in pairs],
        "prompt": [json.dumps(list(p.prompt), ensure_ascii=False) for p in pairs],
        "chosen": [p.chosen for p in pairs],
        "rejected": [p.rejected for p in pairs],
        "source": [p.source for p in pairs],
        "chosen_model": [p.chosen_model for p in pairs],
        "rejected_model": [p.rejected_model for p in pairs],
    }
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pydict(columns, schema=_STAGING_SCHEMA), tmp)


def read_staged_pairs(path: str | Path) -> list[Pair]:
    """Pairs staged for one store shard, in row order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: staged pairs are missing (rerun the extraction to stage them again)")
    table = pq.read_table(path).to_pylist()
    return [
        Pair(
            id=r["id"], row=r["row"], prompt=tuple(json.loads(r["prompt"])), chosen=r["chosen"],
            rejected=r["rejected"], source=r["source"], chosen_model=r["chosen_model"],
            rejected_model=r["rejected_model"],
        )
        for r in table
    ]


class _Stager:
    """Collects the pairs read by the driver into one staging file per store shard."""

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.directory = out_dir / STAGING_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.buffer: list[Pair] = []
        self.index = 0

    def add(self, pair: Pair) -> None:
        self.buffer.append(pair)
        if len(self.buffer) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            _write_staging(self.directory / STAGING_PATTERN.format(self.index), self.buffer)
            self.index += 1
            self.buffer = []


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    """What the driver needs of a model to write the manifest (no weights)."""
    return {
        "spec": asdict(loaded.spec),
        "n_layers": loaded.n_layers,
        "hidden_size": loaded.hidden_size,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "template_mode": loaded.template_mode,
        "identity": dict(loaded.identity),
    }


def _describe_remote(spec: dict[str, Any]) -> dict[str, Any]:
    from pairtrace.models import load_model

    return describe_model(load_model(ModelSpec(**spec)))


def _model_shell(description: dict[str, Any]) -> LoadedModel:
    """A weightless :class:`LoadedModel` carrying a model's identity, depth and width, for the manifest."""
    return LoadedModel(
        model=None, tokenizer=None, spec=ModelSpec(**description["spec"]), n_layers=description["n_layers"],
        hidden_size=description["hidden_size"], device=torch.device(description["device"]),
        dtype=DTYPES[description["dtype"]], template_mode=description["template_mode"],
        identity=description["identity"],
    )


class ShardWorker:
    """A Ray Data actor: loads the model once, then computes and writes whole store shards.

    Args:
        spec: :class:`ModelSpec` fields of the model to load.
        out_dir: The store directory (shared filesystem).
        settings: :class:`pairtrace.vectors.ExtractionSettings` fields.
    """

    def __init__(self, spec: dict[str, Any], out_dir: str, settings: dict[str, Any]) -> None:
        from pairtrace.models import load_model
        from pairtrace.store import build_expected
        from pairtrace.vectors import ExtractionSettings

        self.out_dir = Path(out_dir)
        self.manifest = Manifest.load(self.out_dir)
        self.loaded = load_model(ModelSpec(**spec))
        self.settings = ExtractionSettings(**settings)
        expected = build_expected(self.loaded, self.manifest.layers)
        check_compatible(expected, self.manifest, fields=("model", "template"), where=f"{out_dir} (ray worker)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute the shards listed in ``batch["shard"]``; return their index, rows and seconds."""
        from pairtrace.vectors import compute_shard_tensors

        done, rows, seconds = [], [], []
        for index in batch["shard"].tolist():
            start = time.perf_counter()
            pairs = read_staged_pairs(staging_path(self.out_dir, index))
            first, end = self.manifest.shard_range(index)
            if len(pairs) != end - first:
                raise DataError(
                    f"{staging_path(self.out_dir, index)}: holds {len(pairs)} pairs, expected {end - first}"
                )
            tensors = compute_shard_tensors(
                self.loaded, pairs, self.manifest.layers, max_length=self.manifest.settings.get("max_length", 2048),
                store_dtype=STORE_DTYPES[self.manifest.dtype], settings=self.settings, pooling=self.manifest.pooling,
            )
            write_shard(self.out_dir, index, tensors)
            done.append(index)
            rows.append(len(pairs))
            seconds.append(time.perf_counter() - start)
        return {"shard": np.array(done, dtype=np.int64), "rows": np.array(rows, dtype=np.int64),
                "seconds": np.array(seconds, dtype=np.float64)}


def _ensure_ray(options: RayOptions):
    if not ray_available():
        raise ConfigError('the Ray backend needs Ray Data: pip install "ray[data]"')
    import ray

    if not ray.is_initialized():
        ray.init(address=options.address, **options.init_kwargs)
    return ray


def compute_datapoint_vectors_ray(
    model: LoadedModel | ModelSpec | str | Path,
    pairs: PairSet | PairSource | Sequence[Pair],
    out_dir: str | Path,
    *,
    layers: int | Sequence[int] | None = None,
    shard_size: int = 1024,
    batch_tokens: int | None = None,
    max_length: int = 2048,
    resume: bool = True,
    dtype: str = "float32",
    prompt_sharing: str = "auto",
    min_prompt_fraction: float = DEFAULT_MIN_PROMPT_FRACTION,
    compile: bool | str = False,
    inline_ids_max: int | None = None,
    options: RayOptions | None = None,
    progress: bool = True,
    response_tokens: int | None = None,
    pooling: ResponsePooling | None = None,
) -> VectorStore:
    """:func:`pairtrace.vectors.compute_datapoint_vectors` with the shards computed by a pool of Ray actors.

    Args:
        model: The model: a :class:`ModelSpec` or path (the driver never loads the weights; one Ray task reads
            the model's identity), or an already loaded model (its spec is what the actors load).
        pairs: The pairs (a :class:`PairSet`, a list, or a streaming pair source).
        out_dir: Store directory, on a filesystem every Ray node sees.
        layers: Layers (``None`` = default layer).
        shard_size: Pairs per shard (the unit of work of one actor call).
        batch_tokens: Token budget per forward pass (``None``: the actors' device default).
        max_length: Maximum tokens per sequence.
        resume: Keep finished shards of a matching previous run.
        dtype: Storage dtype.
        prompt_sharing: ``auto``, ``always`` or ``never``.
        min_prompt_fraction: Threshold of ``auto``.
        compile: ``torch.compile`` the decoder blocks in each actor.
        inline_ids_max: Above this many pairs the ids live only in ``pairs.parquet`` (default as the local path).
        options: Cluster, pool size and resources per actor.
        progress: Show a progress bar over shards.
        response_tokens: Average each response's first this many tokens only (``None``: all).
        pooling: The response pooling (instead of ``response_tokens``).

    Returns:
        The complete store.

    Raises:
        ConfigError: Ray is not installed, or bad settings.
        ManifestMismatchError: ``out_dir`` holds a store made with other settings, or an actor loaded another model.
        DataError: Shards are still missing after the run.
    """
    from pairtrace.vectors import INLINE_IDS_MAX, ExtractionSettings, prepare_datapoint_store

    options = options or RayOptions()
    settings = ExtractionSettings(
        batch_tokens=batch_tokens, prompt_sharing=prompt_sharing, min_prompt_fraction=min_prompt_fraction,
        compile=compile,
    )
    ray = _ensure_ray(options)
    if isinstance(model, LoadedModel):
        description = describe_model(model)
    else:
        spec = model if isinstance(model, ModelSpec) else ModelSpec(name_or_path=str(model))
        task = ray.remote(num_cpus=options.num_cpus_per_worker, num_gpus=options.num_gpus_per_worker)(
            _describe_remote
        )
        description = ray.get(task.options(runtime_env=options.runtime_env).remote(asdict(spec)))
    shell = _model_shell(description)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stager = _Stager(out_dir, shard_size)
    try:
        manifest = prepare_datapoint_store(
            shell, as_pair_source(pairs), out_dir, layers=layers, shard_size=shard_size, max_length=max_length,
            resume=resume, dtype=dtype, inline_ids_max=INLINE_IDS_MAX if inline_ids_max is None else inline_ids_max,
            settings=settings, on_pair=stager.add, response_tokens=response_tokens, pooling=pooling,
        )
        stager.flush()
    except ManifestMismatchError:
        shutil.rmtree(stager.directory, ignore_errors=True)
        raise
    manifest.extraction = {**manifest.extraction, "backend": "ray", "ray_workers": options.num_workers}
    manifest.save(out_dir)
    todo = [i for i in range(manifest.n_shards) if not shard_path(out_dir, i).is_file()]
    if todo:
        import ray.data

        constructor = {"spec": description["spec"], "out_dir": str(out_dir), "settings": asdict(settings)}
        dataset = ray.data.from_items([{"shard": i} for i in todo]).map_batches(
            ShardWorker,
            fn_constructor_kwargs=constructor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(options.num_workers, len(todo))),
            num_cpus=options.num_cpus_per_worker,
            num_gpus=options.num_gpus_per_worker,
            runtime_env=options.runtime_env,
        )
        with tqdm(total=len(todo), desc="datapoint vectors (ray)", disable=not progress, unit="shard") as bar:
            for _ in dataset.iter_rows():
                bar.update(1)
    store = VectorStore.open(out_dir, allow_incomplete=True)
    if not store.complete:
        missing = [i for i in range(manifest.n_shards) if not store.is_present(i)]
        raise DataError(f"{out_dir}: {len(missing)} shard(s) missing after the Ray run (first: {missing[0]}); rerun")
    if not options.keep_staging:
        shutil.rmtree(out_dir / STAGING_DIR, ignore_errors=True)
    return VectorStore.open(out_dir)


__all__ = [
    "RayOptions",
    "ShardWorker",
    "compute_datapoint_vectors_ray",
    "describe_model",
    "ray_available",
    "read_staged_pairs",
    "staging_path",
]
