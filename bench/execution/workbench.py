"""Where jobs run: trains or loads a defense, evaluates it clean, runs one cell of the matrix.

A ``Workbench`` belongs to one worker process; it caches the dataset and the last few loaded
defenses so consecutive cells on one defense do not reload it. Everything it returns is a validated
record for the driver to store; it never touches the database itself.
"""

from __future__ import annotations

import io
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.base import Victim, perturbation_norm, threat_model_violation
from bench.execution.jobs import CellJob, EvaluationJob, TrainingJob, VerificationJob
from bench.execution.probes import observe
from bench.execution.timebudget import Budget, TimeBudgetExceeded, time_budget
from bench.foundation.allocator import keep_freed_memory
from bench.foundation.counting import CountingModel, PassCounter
from bench.foundation.data import Dataset, load_dataset
from bench.foundation.device import evaluation_precision, prepare_device
from bench.foundation.errors import RobustMatrixError
from bench.foundation.keys import digest, seed_everything, seed_from, versions
from bench.foundation.models import architecture_name, build_model
from bench.foundation.registry import ATTACKS, DEFENSES, VERIFIERS
from bench.storage.store import (
    CellRecord,
    EvaluationRecord,
    TrainingRecord,
    VerificationRecord,
    decode_mask,
    file_sha256,
    read_checkpoint,
)
from defenses.base import Defense, DeployedModel, StraightThrough, TrainContext, TrainData

EpochCallback = Callable[[str, int, int, float], None]
BatchCallback = Callable[[int, int], None]
AttackProgress = Callable[[str, PassCounter, int, "int | None"], AbstractContextManager[None]]


@dataclass
class LoadedDefense:
    defense: Defense
    model: nn.Module
    deployed: nn.Module
    approximation: nn.Module | None


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path``.lock (POSIX; elsewhere no lock, only duplicate work)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_save(payload: dict[str, Any], path: Path) -> str:
    """Write ``payload`` to ``path`` atomically; returns the sha256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return file_sha256(data)


class Workbench:
    def __init__(
        self,
        dataset: str,
        device: torch.device,
        checkpoint_dir: Path,
        data_dir: str | None = None,
        download: bool = True,
        on_epoch: EpochCallback | None = None,
        on_batch: BatchCallback | None = None,
        on_attack: AttackProgress | None = None,
    ) -> None:
        self.dataset_name = dataset
        self.device = device
        prepare_device(device)
        keep_freed_memory()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.data_dir = data_dir
        self.download = download
        self.on_epoch = on_epoch
        self.on_batch = on_batch
        self.on_attack = on_attack
        self._data: Dataset | None = None
        self._loaded: OrderedDict[str, LoadedDefense] = OrderedDict()
        self._minimal_runs: OrderedDict[str, tuple[torch.Tensor, int, int]] = OrderedDict()
        self._eval_sets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._digests: dict[str, str] = {}
        """training key -> sha256 of the checkpoint this workbench wrote or first verified: a file
        changed under it afterwards is not the model it measured."""

    # -------------------------------------------------------------------------------- data
    @property
    def data(self) -> Dataset:
        if self._data is None:
            self._data = load_dataset(self.dataset_name, self.data_dir, self.download)
        return self._data

    def eval_set(self, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation examples on the device, copied there once per ``n_eval`` (every cell of a
        worker reads them; callers index them, never write them)."""
        if n_eval not in self._eval_sets:
            index = self.data.eval_indices(n_eval)
            self._eval_sets[n_eval] = (self.data.x_test[index].to(self.device), self.data.y_test[index].to(self.device))
        return self._eval_sets[n_eval]

    def _fresh_model(self, defense: Defense) -> nn.Module:
        data = self.data
        return defense.build_model(build_model(data.name, data.image_shape, data.num_classes)).to(self.device)

    # ---------------------------------------------------------------------------- training
    def train(self, job: TrainingJob) -> TrainingRecord:
        """Train the defense, or reuse its checkpoint if one exists for this exact key."""
        spec = DEFENSES.get(job.defense_id)
        path = self.checkpoint_dir / job.checkpoint
        payload, sha256 = self._checkpoint(path, job) or self._train_once(job, path)
        meta = payload["meta"]
        return TrainingRecord(
            training_key=job.training_key,
            defense_id=job.defense_id,
            defense_version=spec.code_version(),
            source=spec.source,
            dataset=job.dataset,
            seed=job.seed,
            kwargs=job.kwargs,
            trained_against=[vars(t) for t in spec.threat_models(job.kwargs)],
            nature=spec.nature(),
            # A pretrained defense records the architecture it declares, not the benchmark's.
            architecture=str(job.kwargs["architecture"])
            if spec.source.startswith("pretrained")
            else architecture_name(job.dataset),
            checkpoint=job.checkpoint,
            epochs=int(meta["epochs"]),
            wall_time=float(meta["wall_time"]),
            forwards=int(meta["forwards"]),
            backwards=int(meta["backwards"]),
            device=str(meta["device"]),
            versions=versions(),
            checkpoint_sha256=sha256,
        )

    def _checkpoint(self, path: Path, job: TrainingJob, warn: bool = True) -> tuple[dict[str, Any], str] | None:
        """The checkpoint of ``job`` at ``path`` as (payload, sha256) if the file is that training's
        (its key inside, and the digest this workbench knows for it, if any); None when it is missing
        or is not, so the caller retrains over it rather than evaluate another model."""
        if not path.exists():
            return None
        try:
            payload, data = read_checkpoint(path, job.training_key, self._digests.get(job.training_key), self.device)
        except RobustMatrixError as exc:
            if warn:
                print(f"robustmatrix: warning: {exc}; retraining {job.defense_id}", file=sys.stderr)
            return None
        sha256 = self._digests.setdefault(job.training_key, file_sha256(data))
        return payload, sha256

    def _train_once(self, job: TrainingJob, path: Path) -> tuple[dict[str, Any], str]:
        """Train under a lock on the checkpoint file: processes sharing a checkpoint folder (shards
        of one matrix) train each defense once; the others wait, then reuse the checkpoint."""
        with _exclusive(path):
            return self._checkpoint(path, job, warn=False) or self._train_and_save(job, path)

    def _train_and_save(self, job: TrainingJob, path: Path) -> tuple[dict[str, Any], str]:
        spec = DEFENSES.get(job.defense_id)
        defense = spec.make(job.dataset, job.kwargs)
        seed_everything(seed_from(job.training_key))
        model = self._fresh_model(defense)
        data = self.data
        # Declared by a model trained elsewhere (defenses/pretrained.py); not on Defense itself,
        # whose source is in every defense's code version (a new attribute there would retrain all).
        if getattr(defense, "needs_training_data", True):
            x, y = data.x_train, data.y_train
        else:  # a model trained elsewhere is only loaded and checked, on a few test images
            x, y = data.x_test[:16], data.y_test[:16]
        train_data = TrainData(x.to(self.device), y.to(self.device), data.num_classes, data.name)
        counter = PassCounter()
        epochs_done = [0]  # as the defense reports them: a distilled student's count includes its teacher's

        def on_epoch(epoch: int, epochs: int, loss: float) -> None:
            epochs_done[0] = max(epochs_done[0], epoch)
            if not math.isfinite(loss):
                raise RobustMatrixError(f"training {job.defense_id} diverged: loss {loss} at epoch {epoch}")
            if self.on_epoch is not None:
                self.on_epoch(job.defense_id, epoch, epochs, loss)

        ctx = TrainContext(self.device, seed_from(job.training_key), counter, on_epoch)
        start = time.perf_counter()
        with training_precision(self.device, job.precision):
            defense.fit(model, train_data, ctx)
        meta = {
            "epochs": epochs_done[0] or int(job.kwargs.get("epochs", 0)),
            "wall_time": time.perf_counter() - start,
            "forwards": counter.forwards,
            "backwards": counter.backwards,
            "device": str(self.device),
            "training_key": job.training_key,
        }
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if broken:
            raise NonFiniteResult(f"training {job.defense_id} produced NaN/inf weights ({broken[0]})")
        payload = {"state_dict": state, "meta": meta}  # the key inside: a load checks it is this training
        self._digests[job.training_key] = _atomic_save(payload, path)
        return payload, self._digests[job.training_key]

    def load(self, job: TrainingJob) -> LoadedDefense:
        """The trained defense, deployed on this workbench's device (cached)."""
        if job.training_key in self._loaded:
            self._loaded.move_to_end(job.training_key)
            return self._loaded[job.training_key]
        path = self.checkpoint_dir / job.checkpoint
        payload, _ = self._checkpoint(path, job) or self._train_once(job, path)
        defense = DEFENSES.get(job.defense_id).make(job.dataset, job.kwargs)
        model = self._fresh_model(defense)
        model.load_state_dict({k: v.to(self.device) for k, v in payload["state_dict"].items()})
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        loaded = LoadedDefense(defense, model, defense.deploy(model), defense.gradient_approximation(model))
        self._loaded[job.training_key] = loaded
        while len(self._loaded) > 3:
            self._loaded.popitem(last=False)
        return loaded

    # -------------------------------------------------------------------------- evaluation
    def evaluate(self, job: EvaluationJob) -> EvaluationRecord:
        """Clean accuracy on the evaluation examples, and what the defense is observed to do."""
        loaded = self.load(job.training)
        x, y = self.eval_set(job.n_eval)
        seed_everything(seed_from(job.eval_key))
        # Inference mode (no autograd bookkeeping at all) for the clean pass only: attacks need graphs.
        with torch.inference_mode(), evaluation_precision(self.device):
            logits = torch.cat([loaded.deployed(x[i : i + 500]) for i in range(0, len(y), 500)])
        _require_finite(logits, f"{job.training.defense_id}'s outputs on clean examples")
        correct = logits.argmax(dim=1) == y
        with evaluation_precision(self.device):
            observed = observe(loaded.deployed, x, y)
        return EvaluationRecord(job.eval_key, job.training.training_key, job.n_eval, correct.cpu().numpy(), observed)

    # -------------------------------------------------------------------------------- cells
    def run_cell(self, job: CellJob) -> CellRecord:
        """Attack the clean-correct evaluation examples. Whatever goes wrong — an exception, NaN/inf
        in the adversarial examples or the defense's outputs, the cell's time budget running out —
        becomes a failed record with its reason; the other cells go on. Out of memory is the batch's
        fault: the cell runs again at half the batch (down to ``MIN_ATTACK_BATCH``), and the record
        says which batch it ran at. A CUDA error is the worker's fault: :class:`DeviceFault`."""
        start = time.perf_counter()
        counter = PassCounter()
        batch = job.batch_size
        try:
            with time_budget(job.timeout) as budget, evaluation_precision(self.device):
                while True:
                    try:
                        robust, mean_norm = self._attack(replace(job, batch_size=batch), counter, budget)
                        break
                    except Exception as exc:
                        if not is_out_of_memory(exc) or batch // 2 < MIN_ATTACK_BATCH:
                            raise
                    batch, counter = batch // 2, PassCounter()  # the passes of the run that produced the result
                    _free_device_memory(self.device)
            status, error = "ok", None
        except TimeBudgetExceeded as exc:
            robust, mean_norm = None, None
            status, error = "failed", f"timeout: cell {exc}"
        except Exception as exc:  # noqa: BLE001 - recorded with its reason; other cells go on
            if is_cuda_error(exc):
                raise DeviceFault(failure_reason(exc)) from exc
            robust, mean_norm = None, None
            status, error = "failed", failure_reason(exc)
            if is_out_of_memory(exc):
                error = f"out of memory at attack batch {batch} (the smallest tried): {error}"[:500]
        return cell_record(
            job,
            status,
            error,
            robust,
            mean_norm,
            counter,
            time.perf_counter() - start,
            str(self.device),
            batch_size=batch,
        )

    # ------------------------------------------------------------------------ verifications
    def verify(self, job: VerificationJob) -> VerificationRecord:
        """Certify the clean-correct evaluation examples, batch by batch. A model the verifier cannot
        bound is ``unsupported`` with the reason (a numpy or randomized preprocess, an unknown module);
        an exception is ``failed`` with its reason; the other jobs go on."""
        start = time.perf_counter()
        n = job.n_eval
        clean = decode_mask(job.clean_mask, n)
        certified = np.zeros(n, dtype=bool)
        status, error = "ok", None
        try:
            loaded = self.load(job.training)
            model, why = certifiable_model(loaded)
            verifier = VERIFIERS.get(job.verifier_id).make(job.training.dataset, job.verifier_kwargs)
            x, y = self.eval_set(n)
            targets = torch.from_numpy(clean).to(self.device).nonzero().squeeze(1)
            seed_everything(seed_from(job.verification_key))  # smoothing's noise draws
            if model is None:
                status, error = "unsupported", why
            with evaluation_precision(self.device):
                for begin in range(0, len(targets) if model is not None else 0, job.batch_size):
                    index = targets[begin : begin + job.batch_size]
                    result = verifier(model, x[index], y[index], job.norm, job.eps)
                    if not result.ran:
                        status, error = "unsupported", result.status
                        break
                    certified[index.cpu().numpy()] = result.certified.cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - recorded with its reason; other jobs go on
            if is_cuda_error(exc):
                raise DeviceFault(failure_reason(exc)) from exc
            status, error = "failed", failure_reason(exc)
        return verification_record(
            job, status, error, certified if status == "ok" else None, time.perf_counter() - start, str(self.device)
        )

    def _victim(self, job: CellJob, counter: PassCounter) -> tuple[Victim, nn.Module]:
        loaded = self.load(job.training)
        approximation = loaded.approximation
        if approximation is None and job.bpda_fallback:
            approximation = StraightThrough(loaded.model, loaded.defense.preprocess)
        # The surrogate's passes are the transfer attack's cost: counted like the defense's.
        surrogate = CountingModel(self.load(job.surrogate).deployed, counter) if job.surrogate is not None else None
        victim = Victim(
            model=CountingModel(loaded.deployed, counter),
            num_classes=self.data.num_classes,
            gradient_model=CountingModel(approximation, counter) if approximation is not None else None,
            surrogate=surrogate,
        )
        return victim, loaded.deployed

    def _minimal(
        self,
        job: CellJob,
        attack: Any,
        victim: Victim,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor,
        counter: PassCounter,
    ) -> torch.Tensor:
        """A minimum-norm attack's smallest adversarial examples on the clean-correct examples, run
        once and shared by the cells of every eps. Seeded independently of eps, so every cell sees the
        same run whichever computes it; each cell reports the run's full cost (it is what the result
        took, and keeps resumed runs identical)."""
        key = minimal_run_key(job)
        if key not in self._minimal_runs:
            run_counter = PassCounter()
            counted = Victim(
                CountingModel(victim.model.model, run_counter),
                victim.num_classes,
                CountingModel(victim.gradient_model.model, run_counter) if victim.gradient_model is not None else None,
                victim.surrogate,
            )
            seed_everything(seed_from(key))
            parts = [
                attack.minimal(counted, x[targets[s : s + job.batch_size]], y[targets[s : s + job.batch_size]]).detach()
                for s in range(0, len(targets), job.batch_size)
            ]
            result = torch.cat(parts) if parts else x[:0]
            self._minimal_runs[key] = (result, run_counter.forwards, run_counter.backwards)
            while len(self._minimal_runs) > 8:
                self._minimal_runs.popitem(last=False)
        result, forwards, backwards = self._minimal_runs[key]
        counter.forwards += forwards
        counter.backwards += backwards
        return result

    def adversarial_batches(
        self, job: CellJob, counter: PassCounter | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A cell's adversarial examples, batch by batch, on its clean-correct examples: (indices into
        the evaluation set, adversarial examples, whether the deployed defense still classifies them
        correctly). Seeded from the cell's key, so calling this again re-creates what the stored cell
        measured (exactly, for a deterministic defense)."""
        counter = counter if counter is not None else PassCounter()
        victim, deployed = self._victim(job, counter)
        x, y = self.eval_set(job.n_eval)
        clean = torch.from_numpy(decode_mask(job.clean_mask, job.n_eval)).to(self.device)
        if job.prior_robust is not None:  # a cascade attacks only what its members' cells left robust
            clean &= torch.from_numpy(decode_mask(job.prior_robust, job.n_eval)).to(self.device)
        seed_everything(seed_from(job.cell_key))
        attack = ATTACKS.get(job.attack_id).make(job.training.dataset, job.attack_kwargs, eps=job.eps)
        targets = clean.nonzero().squeeze(1)
        # Plugin attacks need only be callables; minimum-norm ones subclass Attack (bounded=False).
        minimal = (
            None if getattr(attack, "bounded", True) else self._minimal(job, attack, victim, x, y, targets, counter)
        )
        for start in range(0, len(targets), job.batch_size):
            index = targets[start : start + job.batch_size]
            if minimal is None:
                x_adv = attack(victim, x[index], y[index])
            else:
                x_adv = attack.within_eps(x[index], minimal[start : start + job.batch_size])
                attack._check(x[index], x_adv)
            _require_finite(x_adv, "the attack's adversarial examples")
            problem = threat_model_violation(x[index], x_adv, job.norm, job.eps)
            if problem is not None:  # any attack, a plugin's plain callable included
                raise RobustMatrixError(f"attack {job.attack_id} {problem}")
            with torch.no_grad():
                logits = deployed(x_adv)
            _require_finite(logits, "the defense's outputs on the adversarial examples")
            yield index, x_adv, logits.argmax(dim=1) == y[index]

    def _attack(self, job: CellJob, counter: PassCounter, budget: Budget) -> tuple[np.ndarray, float | None]:
        x, _ = self.eval_set(job.n_eval)
        robust = torch.zeros(job.n_eval, dtype=torch.bool, device=self.device)
        norms = []
        attacked = decode_mask(job.clean_mask, job.n_eval)
        if job.prior_robust is not None:
            attacked = attacked & decode_mask(job.prior_robust, job.n_eval)
        examples = int(attacked.sum())
        batches = -(-examples // job.batch_size)
        shown = self.on_attack(job.label, counter, examples, _declared_forwards(job)) if self.on_attack else None
        with shown or nullcontext():
            for number, (index, x_adv, still_correct) in enumerate(self.adversarial_batches(job, counter)):
                robust[index] = still_correct
                if job.norm in ("linf", "l2", "l1") and (~still_correct).any():
                    norms.append(perturbation_norm((x_adv - x[index])[~still_correct], job.norm))
                if self.on_batch is not None:
                    self.on_batch(number + 1, batches)
                budget.check()
        mean_norm = float(torch.cat(norms).mean()) if norms else None
        if mean_norm is not None and not math.isfinite(mean_norm):
            raise NonFiniteResult(f"mean perturbation is {mean_norm}")
        return robust.cpu().numpy(), mean_norm


def training_precision(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bfloat16 autocast for a ``bf16`` training (weights, their updates and the checkpoint stay
    fp32); nothing for ``fp32``. Only trainings: cells and evaluations always run in fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise RobustMatrixError(f"unknown training precision {precision!r}")


def _declared_forwards(job: CellJob) -> int | None:
    """The attack's declared bound on forward passes per example, for the progress bar (None if it
    declares none, as a plain-callable plugin attack may)."""
    attack = ATTACKS.get(job.attack_id).make(job.training.dataset, job.attack_kwargs, eps=job.eps)
    bound = getattr(attack, "max_passes_per_example", lambda: None)()
    return int(bound[0]) if bound else None


def minimal_run_key(job: CellJob) -> str:
    """What a minimum-norm run depends on: everything in the cell's key except eps."""
    return digest(
        {
            "training": job.training.training_key,
            "attack": job.attack_id,
            "version": job.attack_version,
            "kwargs": job.attack_kwargs,
            "n_eval": job.n_eval,
            "batch_size": job.batch_size,
            "bpda_fallback": job.bpda_fallback,
            "clean": job.clean_mask.hex(),
        }
    )


def cell_record(
    job: CellJob,
    status: str,
    error: str | None,
    robust: np.ndarray | None,
    mean_perturbation: float | None,
    counter: PassCounter,
    wall_time: float,
    device: str,
    batch_size: int | None = None,
) -> CellRecord:
    """``batch_size``: the attack batch the cell ran at, recorded in its ``versions`` as
    ``attack_batch_size`` (smaller than the matrix's after an out-of-memory fallback)."""
    recorded = versions() if batch_size is None else {**versions(), "attack_batch_size": str(batch_size)}
    return CellRecord(
        cell_key=job.cell_key,
        training_key=job.training.training_key,
        dataset=job.training.dataset,
        defense_id=job.training.defense_id,
        attack_id=job.attack_id,
        attack_version=job.attack_version,
        attack_kwargs=job.attack_kwargs,
        family=job.family,
        norm=job.norm,
        eps=job.eps,
        bounded=job.bounded,
        seed=job.training.seed,
        n_eval=job.n_eval,
        status=status,
        error=error,
        clean_mask=decode_mask(job.clean_mask, job.n_eval) if status == "ok" else None,
        robust_mask=robust,
        mean_perturbation=mean_perturbation,
        forwards=counter.forwards,
        backwards=counter.backwards,
        wall_time=wall_time,
        device=device,
        versions=recorded,
    )


def certifiable_model(loaded: LoadedDefense) -> tuple[nn.Module | None, str | None]:
    """What a verifier is given: the classifier itself when the defense adds no preprocessing (its
    deployed model is exactly the classifier), the deployed module when the defense deploys one of its
    own (a smoothed classifier), and nothing — with the reason — for an input transformation, which
    this session certifies through no preprocess (a randomized or numpy step has no interval
    semantics here)."""
    deployed = loaded.deployed
    if isinstance(deployed, DeployedModel):
        if type(loaded.defense).preprocess is Defense.preprocess:
            return deployed.classifier, None
        name = type(loaded.defense).__name__
        return None, f"not certifiable: {name}'s preprocess (an input transformation) has no bound here"
    return deployed, None


def verification_record(
    job: VerificationJob, status: str, error: str | None, certified: np.ndarray | None, wall_time: float, device: str
) -> VerificationRecord:
    return VerificationRecord(
        verification_key=job.verification_key,
        training_key=job.training.training_key,
        dataset=job.training.dataset,
        defense_id=job.training.defense_id,
        verifier_id=job.verifier_id,
        verifier_version=job.verifier_version,
        verifier_kwargs=job.verifier_kwargs,
        norm=job.norm,
        eps=job.eps,
        seed=job.training.seed,
        n_eval=job.n_eval,
        status=status,
        error=error,
        certifies=VERIFIERS.get(job.verifier_id).certifies if job.verifier_id in VERIFIERS else "model",
        clean_mask=decode_mask(job.clean_mask, job.n_eval),
        certified_mask=certified,
        wall_time=wall_time,
        device=device,
        versions=versions(),
    )


def failed_verification(job: VerificationJob, error: str) -> VerificationRecord:
    """A failed record for a verification that could not run at all (its worker died)."""
    return verification_record(job, "failed", error, None, 0.0, "none")


def failed_cell(job: CellJob, error: str, wall_time: float = 0.0, device: str = "none") -> CellRecord:
    """A failed record for a cell that could not run at all (its worker died, its surrogate is unusable)."""
    return cell_record(job, "failed", error, None, None, PassCounter(), wall_time, device)


class NonFiniteResult(RuntimeError):
    """NaN or inf where a number is needed: the result would be meaningless, so the job fails."""


def _require_finite(values: torch.Tensor, what: str) -> None:
    """Per-example values (first dimension) must all be finite."""
    broken = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bool(broken.any()):
        raise NonFiniteResult(f"NaN/inf in {what} ({int(broken.sum())} of {len(values)} examples)")


MIN_ATTACK_BATCH = 8
"""The smallest attack batch an out-of-memory fallback tries; below it the cell fails with the reason."""

_CUDA_ERRORS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error")


class DeviceFault(RuntimeError):
    """A CUDA error (a device-side assert, an illegal address) or an out-of-memory outside a cell's
    fallback: the worker's device is broken or full, not the job — after a device-side assert every
    later kernel in the process fails. Never stored as a result: the executor restarts the worker
    and retries the job (``MAX_FAULT_RETRIES`` times) before recording it as failed."""


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc) and "CUDA" in str(exc)
    )


def is_cuda_error(exc: BaseException) -> bool:
    """An error of the CUDA runtime or its libraries, which poisons the process's CUDA context."""
    return isinstance(exc, RuntimeError) and not is_out_of_memory(exc) and any(t in str(exc) for t in _CUDA_ERRORS)


def _free_device_memory(device: torch.device) -> None:
    """Return the failed batch's cached blocks before the smaller one allocates."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure_reason(exc: BaseException) -> str:
    """One line naming what went wrong, for the database and the failure summary."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]
