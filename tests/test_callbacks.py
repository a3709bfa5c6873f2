"""PatternMonitor and ConvexGapMonitor in real training runs, read back from TensorBoard event files."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from _events import read_scalars, tensor_tags
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hcl.callbacks.convex_gap as convex_gap_module
import hcl.convex.snapshot as snapshot_module
from hcl import TwoLayerReLU
from hcl.callbacks import ConvexGapMonitor, GlobalOptimumMonitor, PatternMonitor
from hcl.convex import fold_bias, fold_weights
from hcl.datamodules import SyntheticRegression
from hcl.patterns import activation_patterns, unique_patterns


def _seed_c(n=60, d=6, hidden=10, bias=False, init_scale=1e-2, weight_decay=0.0, lr=0.05):
    torch.manual_seed(0)
    data = SyntheticRegression(kind="gaussian_linear", n=n, d=d, seed=0, dtype="float64")
    model = TwoLayerReLU(in_features=d, hidden=hidden, bias=bias, init="normal", init_scale=init_scale,
                         weight_decay=weight_decay, lr=lr)
    return model, data


@pytest.mark.slow
def test_pattern_monitor_logs_counts_that_match_the_weights(tmp_path, make_trainer):
    model, data = _seed_c(init_scale=1.0, lr=0.2)
    data.setup("fit")
    X, _ = data.train_tensors()
    initial = activation_patterns(X.double(), model.hidden_layer.weight.detach().double())
    trainer = make_trainer([PatternMonitor(every_n_steps=1)], max_steps=10)
    trainer.fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    for tag in ("patterns/unique", "patterns/dead", "patterns/changed", "patterns/new"):
        assert [step for step, _ in s[tag]] == list(range(10)), tag
    first = unique_patterns(initial)
    assert s["patterns/unique"][0][1] == first.patterns.shape[1]
    assert s["patterns/changed"][0][1] == 0
    assert s["patterns/new"][0][1] == first.patterns.shape[1]
    # The final logged snapshot is that of the weights before the last step, not after it.
    assert all(0 <= v <= 10 for _, v in s["patterns/unique"])


@pytest.mark.slow
def test_forward_hook_and_recomputation_give_the_same_series(tmp_path, make_trainer):
    """Full-batch runs read patterns from the forward pass; a probe recomputes them, and so does a model in eval mode
    (no forward hook: before the backward pass, not after the optimizer's step): all must agree."""
    runs = {}
    for name, probe in (("hook", None), ("probe", True), ("eval", None)):
        model, data = _seed_c(init_scale=1.0, lr=0.3)
        model.train(name != "eval")
        data.setup("fit")
        X, _ = data.train_tensors()
        monitor = PatternMonitor(every_n_steps=2, probe=X if probe else None)
        make_trainer([monitor], max_steps=15, root=tmp_path / name).fit(model, datamodule=data)
        runs[name] = read_scalars(tmp_path / name)
    for tag in ("patterns/unique", "patterns/dead", "patterns/changed", "patterns/new"):
        assert runs["hook"][tag] == runs["probe"][tag] == runs["eval"][tag], tag
        assert [step for step, _ in runs["hook"][tag]] == list(range(0, 15, 2))
    assert any(v > 0 for _, v in runs["hook"]["patterns/changed"])  # something moved, so the test means something


@pytest.mark.parametrize("formulation,bias,weight_decay", [
    ("neurons", False, 0.0), ("patterns", True, 1e-2),
    pytest.param("neurons", True, 1e-2, marks=pytest.mark.slow),
    pytest.param("patterns", False, 0.0, marks=pytest.mark.slow),
])
def test_convex_optimum_never_exceeds_the_objective(tmp_path, make_trainer, formulation, bias, weight_decay):
    model, data = _seed_c(bias=bias, weight_decay=weight_decay, init_scale=0.5)
    monitor = ConvexGapMonitor(every_n_steps=1, formulation=formulation, solver="clarabel")
    make_trainer([monitor], max_steps=8).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    steps = [step for step, _ in s["convex/optimum"]]
    assert steps == list(range(8))
    optimum = dict(s["convex/optimum"])
    objective = dict(s["convex/nonconvex_objective"])
    train = dict(s["train/objective"])
    upper, lower, max_gap = (dict(s[f"convex/{tag}"]) for tag in ("upper_bound", "lower_bound", "max_gap"))
    for step in steps:
        # Not capped: the certified optimum is below L because the network is one with these patterns.
        assert lower[step] <= optimum[step] * (1 + 1e-6) + 1e-9
        assert optimum[step] <= upper[step] * (1 + 1e-6) + 1e-9 and upper[step] <= objective[step] * (1 + 1e-7)
        # The monitor evaluates the weights the training step uses: the same L as the model logs.
        assert objective[step] == pytest.approx(train[step], rel=1e-6)
        assert dict(s["convex/gap"])[step] == pytest.approx(objective[step] - optimum[step], rel=1e-5, abs=1e-7)
        assert max_gap[step] == pytest.approx(objective[step] - lower[step], rel=1e-5, abs=1e-7)
    assert all(code == 0 for _, code in s["convex/status"])
    assert "custom_scalars__config__" in tensor_tags(tmp_path)


@pytest.mark.slow
def test_both_formulations_reproduce_the_seed_step_zero_picture(tmp_path, make_trainer):
    """Seed (c) at step 0: the per-neuron problem is far above 0, the pattern problem fits the linear labels."""
    torch.manual_seed(0)
    data = SyntheticRegression(kind="gaussian_linear", n=100, d=10, seed=0, dtype="float64")
    model = TwoLayerReLU(in_features=10, hidden=20, init="normal", init_scale=1e-3, lr=0.05)
    monitors = [ConvexGapMonitor(formulation="neurons", solver="clarabel", prefix="convex"),
                ConvexGapMonitor(formulation="patterns", solver="clarabel", prefix="convex_patterns")]
    make_trainer(monitors, max_steps=1).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    neurons, patterns = s["convex/optimum"][0][1], s["convex_patterns/optimum"][0][1]
    loss = s["convex/nonconvex_objective"][0][1]
    assert 0.02 < neurons < 0.5 * loss
    assert patterns < 1e-4


@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.slow
def test_each_kind_of_solve_logs_its_own_tags_and_charts(tmp_path, make_trainer, outputs):
    """Scalar output: optimum and its bracket; c > 1: the lower bound alone (the Frobenius problem is not attained);
    gated: the gated relaxation's values under names of their own, never lower_bound or optimum."""
    from hcl import dashboard

    torch.manual_seed(0)
    X = torch.randn(30, 3, dtype=torch.float64)
    Y = torch.stack([X.sum(1).abs(), X[:, 0] - X[:, 1]], 1)[:, :outputs]
    model = TwoLayerReLU(in_features=3, hidden=6, out_features=outputs, weight_decay=1e-2, lr=0.05,
                         init="normal", init_scale=0.5)
    loader = DataLoader(TensorDataset(X, Y.squeeze(-1) if outputs == 1 else Y), batch_size=30)
    monitors = [ConvexGapMonitor(solver="native", prefix="exact"),
                ConvexGapMonitor(solver="native", gated=True, prefix="gated")]
    trainer = make_trainer(monitors, max_steps=3)
    trainer.fit(model, loader)
    s = read_scalars(tmp_path)
    exact = {tag.split("/")[1] for tag in s if tag.startswith("exact/")}
    gated = {tag.split("/")[1] for tag in s if tag.startswith("gated/")}
    common = {"nonconvex_objective", "max_gap", "solve_seconds", "active_neurons", "duality_gap", "status"}
    if outputs == 1:
        assert exact == common | {"optimum", "gap", "upper_bound", "lower_bound"}
    else:
        assert exact == common | {"lower_bound"}
    assert gated == common | {"gated_optimum", "gated_network_bound"}
    for step, bound in s["gated/gated_network_bound"]:
        assert bound <= dict(s["gated/nonconvex_objective"])[step] and bound <= dict(s["gated/gated_optimum"])[step]
    charts = dashboard.layout_of(trainer)["hcl"]
    drawn = set(charts["objective vs convex optimum"][1])
    assert {"gated/gated_optimum", "gated/gated_network_bound", "exact/lower_bound"} <= drawn
    assert ("exact/upper_bound" in drawn) == ("exact/optimum" in drawn) == (outputs == 1)
    # <p>/gap only where it is logged: with the exact problem's optimum, one output
    expected = {"exact/max_gap", "gated/max_gap"} | ({"exact/gap"} if outputs == 1 else set())
    assert set(charts["convex gap"][1]) == expected
    assert set(charts["convex gap"][1]) <= set(s)


class _UserModule(pl.LightningModule):
    """A user's own module: nn.Sequential with biases, plain MSE, nothing hcl-specific."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_user_style_module_works_unchanged(tmp_path, make_trainer):
    torch.manual_seed(1)
    X = torch.randn(40, 3, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
    model = _UserModule()
    loader = DataLoader(TensorDataset(X, y), batch_size=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = [PatternMonitor(), ConvexGapMonitor(formulation="patterns", solver="clarabel")]
        make_trainer(callbacks, max_steps=5).fit(model, loader)
    assert any("weight_decay" in str(w.message) for w in caught)  # λ = 0, mean: said, not silently assumed
    s = read_scalars(tmp_path)
    losses = dict(s["train_loss"])
    for step, value in s["convex/nonconvex_objective"]:
        # mean reduction, λ = 0: the monitor's L is the user's own MSE at that step.
        assert value == pytest.approx(losses[step], rel=1e-6)
        assert dict(s["convex/optimum"])[step] <= value * (1 + 1e-6) + 1e-9
    assert len(s["patterns/unique"]) == 5


def test_model_without_a_stack_is_refused_at_setup(make_trainer):
    class ThreeLayers(_UserModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.randn(10)), batch_size=10)
    with pytest.raises(ValueError, match="no two-layer ReLU stack.*net.0"):
        make_trainer([ConvexGapMonitor()], max_steps=1, logger=False).fit(ThreeLayers(), loader)


@pytest.mark.slow
def test_a_failing_solver_warns_and_training_goes_on(tmp_path, make_trainer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(convex_gap_module, "solve", broken)
    model, data = _seed_c()
    with pytest.warns(UserWarning, match="solver exploded"):
        make_trainer([ConvexGapMonitor()], max_steps=4).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    assert [v for _, v in s["convex/status"]] == [3.0] * 4
    assert len(s["train/objective"]) == 4  # training was not interrupted
    assert "convex/optimum" not in s



@pytest.mark.slow
def test_an_uncertified_native_solve_without_weight_decay_says_why(tmp_path, make_trainer):
    model, data = _seed_c(n=30, hidden=6)  # λ = 0
    said = (r"solver status 'optimal_inaccurate' at step 0; with weight_decay = 0 no bound above 0 is certified, so "
            r"the native solver claims no optimum \(a conic solver's own test does: solver='clarabel'\)")
    with pytest.warns(UserWarning, match=said):
        make_trainer([ConvexGapMonitor(solver="native")], max_steps=1).fit(model, datamodule=data)
    assert [v for _, v in read_scalars(tmp_path)["convex/status"]] == [1.0]

@pytest.mark.parametrize("formulation", [pytest.param("neurons", marks=pytest.mark.slow), "patterns"])
def test_previous_solution_warm_start_carries_each_solve_to_the_next(tmp_path, make_trainer, monkeypatch, formulation):
    """warm_start="previous": every solve after the first starts from the last solution, remapped to the new
    patterns; the optima are those of the default start (both are certified to the solver's tolerance)."""
    from hcl.convex import solve as real_solve
    from hcl.convex.native import remap_warm_start

    calls = []

    def recording_solve(problem, solver, **options):
        solution = real_solve(problem, solver, **options)
        calls.append((problem, options["warm_start"], solution))
        return solution

    monkeypatch.setattr(convex_gap_module, "solve", recording_solve)
    monkeypatch.setattr(snapshot_module, "WARM_MIN_KEPT_PATTERNS", 0.0)  # carry whatever share of patterns is kept
    optima = {}
    for warm_start in ("network", "previous"):
        calls.clear()
        model, data = _seed_c(init_scale=1.0, lr=0.2, weight_decay=1e-2)
        monitor = ConvexGapMonitor(every_n_steps=1, formulation=formulation, solver="native",
                                   warm_start=warm_start)
        make_trainer([monitor], max_steps=6, root=tmp_path / warm_start).fit(model, datamodule=data)
        optima[warm_start] = [v for _, v in read_scalars(tmp_path / warm_start)["convex/optimum"]]
        assert len(calls) == 6 and all(solution.ok for _, _, solution in calls)
        assert len(calls[0][1]) == 3  # the network's own point first
        for (old, _, old_solution), (new, warm, _) in zip(calls, calls[1:]):
            if warm_start == "network":
                assert len(warm) == 3
                continue
            expected = remap_warm_start(old.patterns, old_solution, new.patterns)
            assert torch.equal(warm[0], expected[0]) and torch.equal(warm[1], expected[1])
            assert warm[3] is not None  # the multipliers come along
    assert optima["previous"] == pytest.approx(optima["network"], rel=1e-5, abs=1e-9)


@pytest.mark.slow  # starts a worker process
def test_previous_solution_warm_start_in_the_worker_process(tmp_path, make_trainer):
    """The chain of solutions lives where the solves run: here the worker process."""
    optima = {}
    for name, options in (("sync", {}), ("worker", {"asynchronous": True, "max_pending": 100})):
        model, data = _seed_c(init_scale=1.0, lr=0.2, weight_decay=1e-2)
        monitor = ConvexGapMonitor(every_n_steps=1, solver="native", warm_start="previous", **options)
        make_trainer([monitor], max_steps=5, root=tmp_path / name).fit(model, datamodule=data)
        s = read_scalars(tmp_path / name)
        assert [code for _, code in s["convex/status"]] == [0.0] * 5
        optima[name] = [v for _, v in s["convex/optimum"]]
    assert optima["worker"] == pytest.approx(optima["sync"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_non_finite_weights_are_reported_not_solved(tmp_path, make_trainer):
    model, data = _seed_c()
    with torch.no_grad():
        model.output_layer.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        make_trainer([ConvexGapMonitor()], max_steps=2).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    assert [v for _, v in s["convex/status"]] == [4.0, 4.0]


@pytest.mark.slow
def test_load_solution_moves_the_network_to_the_convex_optimum(tmp_path, make_trainer):
    model, data = _seed_c(weight_decay=1e-3, init_scale=0.5)
    monitor = ConvexGapMonitor(every_n_steps=2, formulation="neurons", solver="clarabel", load_solution=True)
    make_trainer([monitor], max_steps=4).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    optimum, before = dict(s["convex/optimum"]), dict(s["convex/nonconvex_objective"])
    after = dict(s["train/objective"])
    for step in (0, 2):
        # The solve happens before the step's forward pass: the step trains the mapped convex optimum, whose
        # objective equals the convex value (invariant 2), strictly better than the network it replaced.
        assert after[step] == pytest.approx(optimum[step], rel=1e-5)
        assert after[step] < before[step]


def test_bad_arguments_are_refused_early():
    with pytest.raises(ValueError, match="every_n_steps"):
        ConvexGapMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="formulation"):
        ConvexGapMonitor(formulation="layers")
    with pytest.raises(ValueError, match="warm_start"):
        ConvexGapMonitor(warm_start="last")
    with pytest.raises(ValueError, match="weight_decay"):
        ConvexGapMonitor(weight_decay=-1.0)
    with pytest.raises(ValueError, match="probe and target"):
        ConvexGapMonitor(probe=torch.randn(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        PatternMonitor(probe=torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="empty"):
        PatternMonitor(probe=torch.zeros(0, 3))


def test_folded_bias_patterns_match_the_hidden_layer(tmp_path):
    """With a first-layer bias, patterns are those of X̃ w̃ (the bias is the ones column)."""
    torch.manual_seed(0)
    X = torch.randn(30, 4, dtype=torch.float64)
    layer = nn.Linear(4, 7).double()
    direct = activation_patterns(X, layer.weight.detach(), layer.bias.detach())
    folded = activation_patterns(fold_bias(X, True), fold_weights(layer.weight.detach(), layer.bias.detach()))
    assert torch.equal(direct, folded)
    assert torch.equal(direct, layer(X).detach() >= 0)


# ------------------------------------------------------------------------------ what the callbacks share (base)
def test_validate_and_test_leave_the_callbacks_alone(make_trainer):
    """Only fitting searches the stack, resolves λ (with its warning) and registers charts."""
    from hcl import dashboard

    class ThreeLayers(_UserModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]).squeeze(-1), batch[1]))

        def test_step(self, batch, batch_idx):
            self.log("test_loss", nn.functional.mse_loss(self(batch[0]).squeeze(-1), batch[1]))

    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.randn(10)), batch_size=10)
    callbacks = [PatternMonitor(), ConvexGapMonitor(solver="clarabel")]
    trainer = make_trainer(callbacks, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(ThreeLayers(), loader, verbose=False)
        trainer.test(ThreeLayers(), loader, verbose=False)
    assert not any("weight_decay" in str(w.message) for w in caught)
    assert dashboard.layout_of(trainer) == {}
    with pytest.raises(ValueError, match="no two-layer ReLU stack"):  # fitting the same model is refused
        trainer.fit(ThreeLayers(), loader)


class _OddSteps(PatternMonitor):
    """A schedule of its own: the odd steps."""

    def should_run(self, step: int) -> bool:
        return step % 2 == 1


@pytest.mark.slow
def test_should_run_chooses_the_steps(tmp_path, make_trainer):
    model, data = _seed_c(init_scale=1.0, lr=0.2)
    make_trainer([_OddSteps()], max_steps=7).fit(model, datamodule=data)
    s = read_scalars(tmp_path)
    assert [step for step, _ in s["patterns/unique"]] == [1, 3, 5]


@pytest.mark.slow
def test_load_solution_needs_one_output_and_says_when_it_loads_nothing(tmp_path, make_trainer):
    """With c > 1 the solution never fitted the network ("needs 60 neurons but the network has 10", every solve); an
    unsolved result left the weights alone without a word."""
    from hcl.datamodules import TensorDataModule

    X = torch.randn(20, 3)
    data = TensorDataModule(train=(X, torch.randn(20, 3)))
    monitor = ConvexGapMonitor(solver="clarabel", load_solution=True)
    with pytest.raises(ValueError, match="load_solution needs a network with one output"):
        make_trainer([monitor], max_steps=1).fit(TwoLayerReLU(in_features=3, hidden=4, out_features=3), datamodule=data)
    for layer in (ConvexGapMonitor(solver="cvxpylayers"), GlobalOptimumMonitor(solver="cvxpylayers")):  # every solve
        with pytest.raises(ValueError, match="solver='cvxpylayers' solves problems of one output and the network"):
            make_trainer([layer], max_steps=1).fit(TwoLayerReLU(in_features=3, hidden=4, out_features=3),
                                                   datamodule=data)

    model, data = _seed_c(weight_decay=1e-3, init_scale=0.5)
    stopped = ConvexGapMonitor(solver="native", solver_options={"method": "newton", "max_iters": 2}, load_solution=True)
    with pytest.warns(UserWarning, match="no usable solution .*weights not loaded"):
        make_trainer([stopped], max_steps=1).fit(model, datamodule=data)


@pytest.mark.slow
def test_a_step_whose_weights_the_solution_replaced_is_done_in_a_checkpoint_written_inside_it(tmp_path, make_trainer):
    """A checkpoint inside a step leaves the step to the resumed run, except where load_solution already replaced the
    weights the checkpoint holds: solved again from them, the step logged a gap of -0.0 for the network's 0.0007."""
    model, data = _seed_c(weight_decay=1e-3, init_scale=0.5)
    monitor = ConvexGapMonitor(every_n_steps=2, formulation="neurons", solver="clarabel", load_solution=True)
    patterns = PatternMonitor()

    class Crash(pl.Callback):
        saved: dict = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                raise RuntimeError("crash in step 2")

        def on_exception(self, trainer, pl_module, exception):  # as OnExceptionCheckpoint, after the monitors
            Crash.saved = {"gap": monitor.state_dict()["last_step"], "patterns": patterns.state_dict()["last_step"]}

    with pytest.raises(RuntimeError, match="crash in step 2"):
        make_trainer([monitor, patterns, Crash()], max_steps=4).fit(model, datamodule=data)
    assert Crash.saved == {"gap": 2, "patterns": 1}


@pytest.mark.slow
def test_a_non_finite_hidden_bias_is_warned_and_no_pattern_counted(tmp_path, make_trainer):
    """NaN compares false: a neuron with a NaN bias would count as dead (and every count with it) unless the check
    reads the bias as well as the weights."""
    torch.manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64)
    model = TwoLayerReLU(in_features=3, hidden=8, bias=True, lr=1e-12).double()
    with torch.no_grad():
        model.hidden_layer.bias[0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite hidden-layer weights"):
        make_trainer([PatternMonitor()], max_steps=2).fit(model, DataLoader(TensorDataset(X, X[:, :1]), batch_size=40))
    assert not any(tag.startswith("patterns/") for tag in read_scalars(tmp_path))
