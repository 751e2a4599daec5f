"""The training options a command leaves out (apps/train.resolve_defaults), and the
driver's stop once the training loss stops falling (_Run._check_converged)."""

from __future__ import annotations

import pytest

from psctl.apps import train as train_app
from psctl.apps.train import CONVERGE_EPOCHS, CONVERGE_TOL, TrainConfig, optimizer_spec, resolve_defaults, resume_options
from psctl.core.job import JobSpec
from psctl.core.tables import MIN_SHARD_BYTES
from psctl.errors import PsctlError, UsageError
from psctl.models.base import Model
from psctl.models.registry import model_class

pytestmark = pytest.mark.timeout(10)


def resolved(model: str = "softmax", **options) -> TrainConfig:
    cfg = TrainConfig(model, "data.csv", **options)
    resolve_defaults(cfg, model_class(model))
    return cfg


@pytest.mark.parametrize(("model", "lr"), [("logreg", 0.1), ("softmax", 0.1), ("svm", 0.3), ("linreg", 0.1)])
def test_no_optimizer_option_takes_the_linear_models_tuned_defaults(model, lr):
    cfg = resolved(model)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.l2) == ("adagrad", lr, 16, 20, 1e-3)
    assert cfg.converge and set(cfg.defaulted) == {"optimizer", "lr", "batch_size", "epochs", "l2"}
    assert optimizer_spec(cfg) == {"name": "adagrad", "params": {"lr": lr}}


@pytest.mark.parametrize("model", ["logreg", "softmax", "svm", "linreg"])
def test_sparse_input_takes_ftrl_on_per_key_sums(model):
    cfg = TrainConfig(model, "data.svm")
    resolve_defaults(cfg, model_class(model), sparse=True)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.l2, cfg.converge) == ("ftrl", 0.1, 16, 20, 1e-3, True)
    assert optimizer_spec(cfg) == {"name": "ftrl", "params": {"lr": 0.1, "l1": 0.0, "l2": 1e-3}}
    assert model_class(model)(5, ["0", "1", "2"], sparse=True).key_sums
    assert not model_class(model)(5, ["0", "1", "2"]).key_sums


def test_l1_alone_is_ftrls_on_sparse_input_and_refused_on_dense():
    cfg = TrainConfig("logreg", "data.svm", l1=1.0)
    cfg.check()  # the defaults are not filled in yet: nothing to refuse
    resolve_defaults(cfg, model_class("logreg"), sparse=True)
    cfg.check()
    assert optimizer_spec(cfg)["params"]["l1"] == 1.0
    dense = resolved("logreg", l1=1.0)
    with pytest.raises(PsctlError, match="--l1 is FTRL's .*--optimizer adagrad has none"):
        dense.check()


def test_mf_has_its_own_defaults():
    cfg = resolved("mf")
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.l2) == ("adagrad", 0.1, 512, 10, 0.1)


def test_given_options_win_and_epochs_given_means_exactly_that_many():
    cfg = resolved(batch_size=64, l2=0.0, epochs=5)
    assert (cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.l2) == ("adagrad", 64, 5, 0.0)
    assert not cfg.converge and cfg.defaulted == ("optimizer", "lr")


@pytest.mark.parametrize(
    ("options", "optimizer", "lr"),
    [({"lr": 0.5}, "sgd", 0.5), ({"lr_decay": 0.01}, "sgd", 0.1), ({"optimizer": "adam"}, "adam", 0.01),
     ({"optimizer": "ftrl"}, "ftrl", 0.1), ({"optimizer": "adagrad"}, "adagrad", 0.1)],
)  # fmt: skip
def test_an_optimizer_option_keeps_the_first_defaults(options, optimizer, lr):
    """Explicit flags work as before the tuned defaults: sgd, batch 32, 10 epochs, no L2."""
    cfg = resolved("mf", **options)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.l2) == (optimizer, lr, 32, 10, 0.0)
    assert not cfg.converge


def test_a_model_class_without_defaults_keeps_the_first_ones():
    class Custom(Model):
        pass

    cfg = TrainConfig("pkg.mod:Custom", "data.csv")
    resolve_defaults(cfg, Custom)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.l2, cfg.converge) == ("sgd", 0.1, 32, 10, 0.0, False)


def test_resolving_twice_changes_nothing():
    cfg = resolved()
    cfg.epochs = 7
    resolve_defaults(cfg, model_class("mf"))
    assert (cfg.epochs, cfg.batch_size) == (7, 16)


def test_resume_takes_the_checkpoints_values_for_options_left_out():
    cfg = resolved("softmax")
    spec = JobSpec(model="softmax", n_workers=8, mode="sync", partitions=(), epochs=10, batch_size=32, l2=0.0,
                   optimizer={"name": "sgd", "params": {"lr": 0.3, "lr_decay": 0.0}})  # fmt: skip
    resume_options(cfg, spec)
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.l2) == ("sgd", 0.3, 32, 10, 0.0)


def test_resume_refuses_a_given_option_the_checkpoint_contradicts():
    cfg = resolved("softmax", batch_size=64)
    spec = JobSpec(model="softmax", n_workers=8, mode="sync", partitions=(), epochs=10, batch_size=32, optimizer={"name": "sgd", "params": {"lr": 0.1}})
    with pytest.raises(UsageError, match="--batch-size 64"):
        resume_options(cfg, spec)


def test_resume_refuses_another_min_shard_bytes_and_takes_the_same_one():
    spec = JobSpec(model="softmax", n_workers=8, mode="sync", partitions=(), epochs=10, batch_size=32,
                   optimizer={"name": "sgd", "params": {"lr": 0.1}}, min_shard_bytes=0)  # fmt: skip
    with pytest.raises(UsageError, match=r"--min-shard-bytes 1MB \(the checkpoint has 0\)"):
        resume_options(resolved("softmax", min_shard_bytes="1MB"), spec)
    resume_options(resolved("softmax", min_shard_bytes="0"), spec)
    resume_options(resolved("softmax"), spec)


def test_min_shard_bytes_takes_a_size_or_0_and_refuses_anything_else():
    assert train_app.min_shard_bytes(TrainConfig("logreg", "d.csv")) == MIN_SHARD_BYTES
    assert train_app.min_shard_bytes(TrainConfig("logreg", "d.csv", min_shard_bytes="0")) == 0
    assert train_app.min_shard_bytes(TrainConfig("logreg", "d.csv", min_shard_bytes="64k")) == 64 * 1024
    with pytest.raises(UsageError, match="--min-shard-bytes must be a size such as 64MB"):
        TrainConfig("logreg", "d.csv", min_shard_bytes="lots").check()


class _Control:
    def __init__(self):
        self.sent = []

    def notify(self, kind, body):
        self.sent.append(kind)


async def _feed(losses, epochs=20):
    cfg = resolved()
    run = train_app._Run(cfg, model_class("softmax"), JobSpec(model="softmax", n_workers=1, mode="sync", partitions=(), epochs=epochs), _Control())
    events = []
    for epoch, loss in enumerate(losses):
        await run.on_epoch({"kind": "epoch", "epoch": epoch, "loss": loss, "samples": 10}, events.append)
    return run, events


async def test_stops_after_three_epochs_without_a_fall_of_tol():
    step = CONVERGE_TOL / 2  # falling, but by less than tol each epoch
    run, events = await _feed([1.0, 0.5, 0.5 - step, 0.5 - 2 * step, 0.5 - 3 * step, 0.4])
    assert events == [{"kind": "converged", "epoch": 4, "epochs": CONVERGE_EPOCHS, "tol": CONVERGE_TOL}]
    assert run.control.sent and run.stopping


async def test_a_fall_of_tol_restarts_the_count():
    _, events = await _feed([1.0, 1.0, 1.0, 0.99, 0.99, 0.98])
    assert events == []


async def test_no_stop_message_at_the_last_epoch():
    run, events = await _feed([1.0, 1.0, 1.0, 1.0], epochs=4)
    assert events == [] and not run.control.sent
