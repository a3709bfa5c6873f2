"""ConvexReLU: the convex program trained step by step, its certificate, checkpoints, DDP and its argument checks."""

from __future__ import annotations

import cvxpy as cp
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _convex_model_utils import LAM, Recorder, _data, _trainer
from _events import next_second, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator

from hcl import ConvexReLU, TwoLayerReLU
from hcl.convex import ConvexProblem, dual_certificate
from hcl.convex.gated import certify, cone_violations, gate_mask, gates_from_weights, sample_gates
from hcl.convex.problem import fold_bias
from hcl.datamodules.base import TensorDataModule
from hcl.patterns import activation_patterns


def _step_size(X: torch.Tensor, gates: torch.Tensor, reduction: str = "mean") -> float:
    """``1/L`` of the gated smooth part: ``L = 2s λ_max(Σ_i D_i X̃X̃ᵀD_i)``."""
    Xf = fold_bias(X, True)
    D = gate_mask(Xf, gates.to(Xf)).to(Xf)
    K = sum(torch.outer(D[:, i], D[:, i]) * (Xf @ Xf.T) for i in range(D.shape[1]))
    s = 1.0 / X.shape[0] if reduction == "mean" else 1.0
    return 1.0 / (2.0 * s * float(torch.linalg.eigvalsh(K).max()))


def _cvxpy_optimum(X, Y, gates, lam, relu: bool) -> float:
    """The same problem by cvxpy and Clarabel: the gated group lasso, or the ReLU program with its cones."""
    Xf = fold_bias(X, True).numpy()
    D = (Xf @ gates.numpy() >= 0).astype(float)
    n, c = Y.shape
    P = D.shape[1]
    U = [cp.Variable((Xf.shape[1], c)) for _ in range(P)]
    V = [cp.Variable((Xf.shape[1], c)) for _ in range(P)] if relu else []
    pred = sum(cp.multiply(D[:, [i]], Xf @ (U[i] - V[i] if relu else U[i])) for i in range(P))
    objective = cp.sum_squares(pred - Y.numpy()) / n + 2 * lam * sum(cp.norm(W, "fro") for W in U + V)
    constraints = []
    for i in range(P):
        sign = (2 * D[:, [i]] - 1)
        constraints += [cp.multiply(sign, Xf @ U[i]) >= 0, cp.multiply(sign, Xf @ V[i]) >= 0] if relu else []
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(solver=cp.CLARABEL)
    return float(problem.value)


@pytest.mark.parametrize("c", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_gated_training_decreases_and_certifies_below_the_optimum(tmp_path, c):
    X, Y = _data(c=c)
    lam = 0.1  # a sparse optimum: proximal gradient reaches a small gap in a few hundred steps
    model = ConvexReLU(in_features=3, out_features=c, num_gates=6, weight_decay=lam, optimizer="sgd", lr=1.0,
                       certify_every_n_steps=50).double()
    model.hparams.lr = _step_size(X, model.gates)
    recorder = Recorder()
    _trainer(tmp_path, 250, [recorder]).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    objectives = np.array(recorder.objectives)
    # proximal gradient with step 1/L never increases the objective
    assert np.all(np.diff(objectives) <= 1e-12) and objectives[0] - objectives[-1] > 0.05
    optimum = _cvxpy_optimum(X, Y, model.gates, lam, relu=False)
    final = certify(X, Y, model.gates, model.U, weight_decay=lam, reduction="mean", bias=True)
    assert final.lower_bound <= optimum + 1e-7 <= final.objective + 2e-7
    assert final.gap < 1e-3
    assert final.objective - optimum < 1e-3 * max(1.0, optimum)
    # the first certificate (step 0, at zero) is valid too, and far from tight
    early = certify(X, Y, model.gates, torch.zeros_like(model.U), weight_decay=lam, reduction="mean", bias=True)
    assert early.lower_bound <= optimum and early.gap > 0.1


def test_logged_certificate_is_the_engines_bound(tmp_path):
    X, Y = _data(n=25, c=2)
    model = ConvexReLU(in_features=3, out_features=2, num_gates=5, weight_decay=LAM, optimizer="adam", lr=0.05,
                       output_bias=True, certify_every_n_steps=0).double()
    trainer = _trainer(tmp_path, 5)
    trainer.fit(model, datamodule=TensorDataModule(train=(X, Y)))
    logged = model.certify_and_log()
    Xf = fold_bias(X, True)
    problem = ConvexProblem(Xf, Y, gate_mask(Xf, model.gates), weight_decay=LAM, output_bias=True)
    U = model.U.detach().permute(1, 0, 2)
    assert logged["convex_train/lower_bound"] == pytest.approx(
        dual_certificate(problem, U, torch.zeros_like(U), model.b0.detach(), gated=True), rel=1e-10, abs=1e-12)
    assert logged["convex_train/objective"] == pytest.approx(
        float(problem.objective(U, torch.zeros_like(U), model.b0.detach())), rel=1e-10)
    # chunking changes nothing
    chunked = certify(X, Y, model.gates, model.U, None, model.b0, weight_decay=LAM, reduction="mean", bias=True,
                      chunk_size=4)
    assert chunked.lower_bound == pytest.approx(logged["convex_train/lower_bound"], rel=1e-10)


@pytest.mark.parametrize("reduction, output_bias", [("mean", False), ("sum", True)])
def test_the_relu_certificate_is_the_engines_bound_with_the_cone_penalty_multipliers(reduction, output_bias):
    """With ρ > 0 the ReLU variant's certificate takes μ = 2ρs·violation: the engine's certificate with those
    multipliers, at points outside their cones, is the same number (a sign slip in μ had gone unseen)."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(30, 2, generator=g, dtype=torch.float64), torch.randn(30, 1, generator=g, dtype=torch.float64)
    gates = sample_gates(3, 6, seed=0, dtype=torch.float64)
    Xf = fold_bias(X, True)
    D = gate_mask(Xf, gates)
    problem = ConvexProblem(Xf, Y, D, weight_decay=LAM, reduction=reduction, output_bias=output_bias)
    b0 = torch.randn(1, generator=g, dtype=torch.float64) if output_bias else None
    for rho in (0.7, 5.0):
        U, V = (0.3 * torch.randn(3, 6, 1, generator=g, dtype=torch.float64) for _ in range(2))
        bound = certify(X, Y, gates, U, V, b0, weight_decay=LAM, reduction=reduction, bias=True, cone_penalty=rho)
        assert bound.violation > 0
        mu = 2 * rho * problem.scale * torch.stack([cone_violations(Xf, D, U), cone_violations(Xf, D, V)], dim=1)
        engine = dual_certificate(problem, U.permute(1, 0, 2), V.permute(1, 0, 2), b0, multipliers=mu)
        assert bound.lower_bound == pytest.approx(engine, rel=1e-10, abs=1e-14)


def test_gates_taken_from_a_network_are_its_patterns_samples_on_a_hyperplane_included():
    """Integer weights put samples exactly on hyperplanes: a gate counts them active, as the network's patterns do."""
    X = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [-1.0, 1.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    bias = torch.tensor([-1.0, -1.0, 0.0], dtype=torch.float64)
    gates = gates_from_weights(weight, bias, 3)
    patterns = activation_patterns(X, weight, bias)
    assert bool((X @ weight.T + bias == 0).any())  # the case under test
    assert torch.equal(gate_mask(fold_bias(X, True), gates), patterns)


def test_relu_variant_mapped_network_reproduces_the_convex_prediction():
    X, _ = _data(n=40, d=3)
    net = TwoLayerReLU(in_features=3, hidden=5, out_features=2, bias=True, init="normal").double()
    gates = torch.cat([net.hidden_layer.weight, net.hidden_layer.bias[:, None]], dim=1).detach()
    model = ConvexReLU(in_features=3, out_features=2, variant="relu", gates=gates).double()
    alpha = net.output_layer.weight.detach().T  # (m, c)
    with torch.no_grad():
        # network → convex: u_i = w̃_i α_i⁺ᵀ, v_i = w̃_i α_i⁻ᵀ, feasible for the neuron's own pattern
        model.U.copy_(gates.T.unsqueeze(-1) * alpha.clamp(min=0).unsqueeze(0))
        model.V.copy_(gates.T.unsqueeze(-1) * (-alpha).clamp(min=0).unsqueeze(0))
    with torch.no_grad():
        convex, mapped, violation = model._outputs(model.fold(X))
    assert float(violation.max()) == 0.0
    torch.testing.assert_close(mapped, convex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(X).detach(), net(X).detach(), rtol=1e-10, atol=1e-12)
    # an infeasible point: the mapped network differs and the violation says so
    with torch.no_grad():
        model.U.neg_()
        convex, mapped, violation = model._outputs(model.fold(X))
    assert float(violation.max()) > 0 and not torch.allclose(mapped, convex)


@pytest.mark.slow
def test_relu_training_certifies_a_bound_below_the_cvxpy_optimum(tmp_path):
    X, Y = _data(n=20, d=2)
    rho = 50.0
    model = ConvexReLU(in_features=2, out_features=1, num_gates=4, variant="relu", weight_decay=LAM,
                       optimizer="sgd", lr=1.0, cone_penalty=rho, certify_every_n_steps=0).double()
    Xf = fold_bias(X, True)
    # 1/L of the smooth part: the data term of U − V (twice the gated one) plus the cone penalty's curvature
    curvature = 2.0 / _step_size(X, model.gates) + 2 * rho / X.shape[0] * float(torch.linalg.eigvalsh(Xf.T @ Xf).max())
    model.hparams.lr = 1.0 / curvature
    recorder = Recorder()
    _trainer(tmp_path, 300, [recorder]).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    optimum = _cvxpy_optimum(X, Y, model.gates, LAM, relu=True)
    result = certify(X, Y, model.gates, model.U, model.V, weight_decay=LAM, reduction="mean", bias=True,
                     cone_penalty=rho)
    assert result.lower_bound <= optimum + 1e-7
    # the penalty's multipliers make the bound much better than μ = 0 (the gated relaxation's bound)
    plain = certify(X, Y, model.gates, model.U, model.V, weight_decay=LAM, reduction="mean", bias=True)
    assert plain.lower_bound < 0.5 * result.lower_bound
    assert recorder.objectives[-1] < 0.6 * recorder.objectives[0]
    assert result.violation < 0.05 * float(Y.abs().max())


def test_checkpoint_resume_continues_identically(tmp_path):
    X, Y = _data(n=24, c=3)
    labels = Y.argmax(1)

    def new_model(seed: int = 0) -> ConvexReLU:
        return ConvexReLU(in_features=3, out_features=3, num_gates=7, weight_decay=LAM, optimizer="adam", lr=0.05,
                          output_bias=True, gate_seed=seed, certify_every_n_steps=2).double()

    def data() -> TensorDataModule:  # 3 mini-batches per epoch
        return TensorDataModule(train=(X, labels), num_classes=3, batch_size=8, seed=3)

    straight = new_model()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path, 9, [saver], enable_checkpointing=True).fit(straight, datamodule=data())
    (path,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")  # after 6 steps, at an epoch's end
    resumed = new_model(seed=99)  # other gates: the checkpoint's buffer must replace them
    _trainer(tmp_path, 9).fit(resumed, datamodule=data(), ckpt_path=path)
    torch.testing.assert_close(resumed.gates, straight.gates, rtol=0, atol=0)
    for name in ("U", "b0"):
        torch.testing.assert_close(getattr(resumed, name), getattr(straight, name), rtol=1e-12, atol=1e-14)
    loaded = ConvexReLU.load_from_checkpoint(path)
    torch.testing.assert_close(loaded.gates, straight.gates.float(), rtol=0, atol=0)
    assert loaded.hparams.num_gates == 7 and loaded.hparams.optimizer == "adam"


def test_a_resumed_run_logs_each_certificate_step_once(tmp_path):
    X, Y = _data(n=24, c=1)

    def run(max_steps: int, ckpt_path=None) -> None:
        model = ConvexReLU(in_features=3, num_gates=5, weight_decay=LAM, optimizer="sgd", lr=0.05,
                           certify_every_n_steps=2).double()
        logger = TensorBoardLogger(str(tmp_path), name="run", version=0)  # the same run, continued
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        _trainer(tmp_path, max_steps, [saver], logger=logger, log_every_n_steps=1, enable_checkpointing=True).fit(
            model, datamodule=TensorDataModule(train=(X, Y), batch_size=8, seed=3), ckpt_path=ckpt_path)

    run(6)  # certificates at 0, 2, 4 and at the end, 6
    (path,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")  # after 6 steps
    next_second()
    run(9, ckpt_path=path)  # at 6 again (before its update), 8 and the end, 9
    # the run folder as TensorBoard reads it: one accumulator over its files, which the restart marker purges
    run_dir = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    run_dir.Reload()
    assert [event.step for event in run_dir.Scalars("convex_train/objective")] == [0, 2, 4, 6, 8, 9]
    assert [event.step for event in run_dir.Scalars("train/objective")] == list(range(9))


def test_gates_from_a_checkpoint_and_classification_metrics(tmp_path):
    net = TwoLayerReLU(in_features=3, hidden=4, out_features=2, bias=True)
    path = tmp_path / "net.ckpt"
    torch.save({"state_dict": net.state_dict()}, path)
    model = ConvexReLU(in_features=3, out_features=2, gates=str(path))
    expected = torch.cat([net.hidden_layer.weight, net.hidden_layer.bias[:, None]], dim=1).detach().T
    torch.testing.assert_close(model.gates, expected)
    assert model.hparams.num_gates == 4 and "gates" not in model.hparams
    assert model.hparams_initial.num_gates == 4  # what the loggers record (was the unused default, 100)
    X, Y = _data(n=30, c=2)
    dm = TensorDataModule(train=(X[:20], Y[:20].argmax(1)), val=(X[20:], Y[20:].argmax(1)),
                          test=(X[20:], Y[20:].argmax(1)), num_classes=2)
    trainer = _trainer(tmp_path, 3)
    model = model.double()
    trainer.fit(model, datamodule=dm)
    metrics = dict(trainer.callback_metrics)
    for key in ("train/acc", "val/acc", "convex_train/lower_bound", "convex_train/duality_gap"):
        assert key in metrics, key
    assert float(metrics["convex_train/lower_bound"]) <= float(metrics["convex_train/objective"])
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test/acc"]) <= 1.0
    assert "test/objective" in trainer.callback_metrics


def test_certificates_are_logged_on_schedule_and_at_the_end(tmp_path):
    X, Y = _data(n=20, c=1)
    model = ConvexReLU(in_features=3, num_gates=4, weight_decay=LAM, optimizer="sgd", lr=0.05,
                       certify_every_n_steps=3).double()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    _trainer(tmp_path, 6, logger=logger, log_every_n_steps=1).fit(model, datamodule=TensorDataModule(train=(X, Y)))
    scalars = read_scalars(logger.log_dir)
    # steps 0 and 3 before their updates, and the final point at step 6
    assert [step for step, _ in scalars["convex_train/lower_bound"]] == [0, 3, 6]
    for (_, bound), (_, value) in zip(scalars["convex_train/lower_bound"], scalars["convex_train/objective"]):
        assert bound <= value
    assert [step for step, _ in scalars["train/objective"]] == list(range(6))


def test_a_diverged_run_says_so_and_logs_no_certificate_of_its_nan(tmp_path):
    X, Y = _data(n=20, c=1)
    # a cone penalty far too large for the step: the iterates grow ~10⁹× a step, past float64 within 30 steps
    model = ConvexReLU(in_features=3, num_gates=4, weight_decay=LAM, variant="relu", cone_penalty=1e12,
                       optimizer="sgd", lr=0.05, certify_every_n_steps=2).double()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    said = r"ConvexReLU: the objective or its variables are not finite at step \d+: training diverged"
    with pytest.warns(UserWarning, match=said):
        _trainer(tmp_path, 30, logger=logger, log_every_n_steps=1).fit(model,
                                                                      datamodule=TensorDataModule(train=(X, Y)))
    for tag, points in read_scalars(logger.log_dir).items():
        if tag.startswith("convex_train/"):
            assert all(np.isfinite(value) for _, value in points), (tag, points)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"variant": "leaky"}, "variant must be one of"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"momentum": 1.0}, "momentum must lie in"),
        ({"cone_penalty": -1.0}, "cone_penalty must be a positive number"),
        ({"num_gates": 0}, "num_gates must be a positive integer"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"reduction": "max"}, "reduction"),
        ({"certify_every_n_steps": -2}, "certify_every_n_steps"),
        ({"gates": [[1.0, 2.0]]}, "gates have 2 features but the data has 4"),
        ({"gates": "/nonexistent/net.ckpt"}, "no checkpoint"),
        # "no" built an output bias, "yes" an int() error naming nothing, 1.5 the gates of seed 1, True a step of 1
        ({"output_bias": "no"}, "bias and output_bias must be bools"),
        ({"bias": "yes"}, "bias and output_bias must be bools"),
        ({"gate_seed": 1.5}, "gate_seed must be an integer"),
        ({"lr": True}, "lr must be a positive number"),
        # Adam ignored a momentum, True read as a penalty of 1
        ({"momentum": 0.5}, "momentum applies to optimizer='sgd' only"),
        ({"cone_penalty": True}, "cone_penalty must be a positive number"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    error = FileNotFoundError if message == "no checkpoint" else TypeError if "be an integer" in message else ValueError
    with pytest.raises(error, match=message):
        ConvexReLU(in_features=3, **arguments)


def test_sampled_gates_depend_on_the_seed_only():
    a = ConvexReLU(in_features=4, num_gates=9, gate_seed=5)
    b = ConvexReLU(in_features=4, num_gates=9, gate_seed=5)
    assert a.gates.shape == (5, 9)
    torch.testing.assert_close(a.gates, b.gates, rtol=0, atol=0)
    torch.testing.assert_close(a.gates, sample_gates(5, 9, 5))
    assert not torch.equal(a.gates, ConvexReLU(in_features=4, num_gates=9, gate_seed=6).gates)


class _ShutDownTheGroup(pl.Callback):
    """Each spawned worker leaves together and closes its process group at the end of fit: a gloo group left to the
    interpreter's exit, while the other rank is still busy, can abort the worker (``std::terminate`` in a thread's
    destructor)."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.xdist_group("ddp")  # one DDP run at a time under pytest-xdist (tests/test_ddp.py)
# relu and "sum": the cones' violation is gathered, and a rank that certified every point would count each twice
@pytest.mark.parametrize("variant,reduction,lr", [("gated", "mean", 0.2), ("relu", "sum", 0.005)])
def test_ddp_two_processes_match_one(tmp_path, variant, reduction, lr):
    X, Y = _data(n=31, d=3, c=2)
    tags = ["train/objective", "train/data_loss", "train/acc", "convex_train/objective", "convex_train/lower_bound"]
    tags += ["train/cone_violation"] if variant == "relu" else []

    def run(devices: int) -> tuple[dict[str, float], ConvexReLU]:
        model = ConvexReLU(in_features=3, out_features=2, num_gates=6, variant=variant, reduction=reduction,
                           weight_decay=LAM, optimizer="sgd", lr=lr, momentum=0.5, output_bias=True,
                           certify_every_n_steps=2).double()
        trainer = _trainer(tmp_path / str(devices), 5, devices=devices, callbacks=[_ShutDownTheGroup()],
                           strategy="ddp_spawn" if devices > 1 else "auto")
        trainer.fit(model, datamodule=TensorDataModule(train=(X, Y)))
        return {tag: float(trainer.callback_metrics[tag]) for tag in tags}, model

    one, model_one = run(1)
    two, model_two = run(2)
    assert two == pytest.approx(one, rel=1e-6, abs=1e-9)
    assert variant == "gated" or one["train/cone_violation"] > 0  # the gathered maximum is the case under test
    torch.testing.assert_close(model_two.U, model_one.U, rtol=1e-6, atol=1e-9)


class _NoRoomOnRankZero(pl.Callback):
    """Rank 0 sees no free memory for the certificate, rank 1 enough (set in each spawned process)."""

    def setup(self, trainer, pl_module, stage):
        import hcl.convex_model as convex_model_module

        convex_model_module.free_memory = lambda where: 0 if trainer.global_rank == 0 else None


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank waiting in the certificate's collective while the other trains hangs the run
@pytest.mark.xdist_group("ddp")
def test_a_certificate_one_rank_has_no_room_for_is_skipped_on_every_rank(tmp_path):
    X, Y = _data(n=31, d=3, c=2)
    model = ConvexReLU(in_features=3, out_features=2, num_gates=6, weight_decay=LAM, optimizer="sgd", lr=0.2,
                       certify_every_n_steps=1).double()
    callbacks = [_NoRoomOnRankZero(), _ShutDownTheGroup()]
    trainer = _trainer(tmp_path, 3, devices=2, strategy="ddp_spawn", callbacks=callbacks)
    trainer.fit(model, datamodule=TensorDataModule(train=(X, Y)))  # (the skip's warning is said in the workers)
    assert "train/objective" in trainer.callback_metrics  # rank 0's, back from the workers
    assert "convex_train/objective" not in trainer.callback_metrics


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_mini_batch_step_estimates_the_full_objectives_gradient(tmp_path, reduction):
    """An epoch of tiny SGD steps on batches of B moves the variables as n/B full-batch steps do, for either
    reduction (with "sum" the batch's own sum, B/n of the full one, solved a problem with a penalty n/B too strong)."""
    X, Y = _data(n=24)

    def moved(batch_size: int, steps: int) -> torch.Tensor:
        model = ConvexReLU(in_features=3, num_gates=4, weight_decay=0.0, optimizer="sgd", lr=1e-7,
                           reduction=reduction, gate_seed=0, certify_every_n_steps=0).double()
        start = model.U.detach().clone()
        data = TensorDataModule(train=(X, Y), batch_size=batch_size, seed=1)
        _trainer(tmp_path, steps).fit(model, datamodule=data)
        return model.U.detach() - start

    full, epoch = moved(24, 1), moved(6, 4)  # one epoch of 4 batches
    torch.testing.assert_close(epoch, 4 * full, rtol=1e-3, atol=1e-12)
