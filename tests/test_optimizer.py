"""offprune.nets.FusedAdam: torch's fused Adam with a cheaper step, bit for bit the same."""

import io

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from offprune.nets import FusedAdam, adam, steps_taken


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def twin_params(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(40, 7)), torch.nn.Parameter(torch.randn(7)),
            torch.nn.Parameter(torch.randn(3, 40))]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def set_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def step_both(optimizer, reference, ours, theirs) -> None:
    """One step of each with the same random gradients."""
    grads = [torch.randn_like(p) for p in ours]
    set_grads(ours, grads)
    set_grads(theirs, grads)
    optimizer.step()
    reference.step()


def test_adam_gives_the_fused_adam_and_the_same_bits_as_torchs_through_a_checkpoint():
    ours, theirs = twin_params()
    optimizer = adam(ours, 1e-3)
    reference = torch.optim.Adam(theirs, lr=1e-3, fused=True)
    assert isinstance(optimizer, FusedAdam)
    for step in range(25):
        step_both(optimizer, reference, ours, theirs)
        if step == 3:  # a schedule changing the learning rate is followed
            for group in (*optimizer.param_groups, *reference.param_groups):
                group["lr"] = 3e-4
        if step == 10:  # a resumed run: state saved and loaded into a new optimizer
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            optimizer = FusedAdam(ours, lr=1.0)
            optimizer.load_state_dict(torch.load(buffer))
    assert optimizer._plan is not None  # the fast path ran
    assert all(same_bits(a, b) for a, b in zip(ours, theirs))
    for a, b in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert same_bits(optimizer.state[a][key], reference.state[b][key])
    assert steps_taken(optimizer) == 25


def test_a_parameter_without_a_gradient_is_left_alone_as_by_torch():
    ours, theirs = twin_params(1)
    optimizer, reference = adam(ours, 1e-2), torch.optim.Adam(theirs, lr=1e-2, fused=True)
    for step in range(6):
        grads = [torch.randn_like(p) for p in ours]
        if step in (2, 3):
            grads[1] = None  # e.g. a frozen head this update
        set_grads(ours, grads)
        set_grads(theirs, grads)
        optimizer.step()
        reference.step()
    assert all(same_bits(a, b) for a, b in zip(ours, theirs))
    assert int(optimizer.state[ours[1]]["step"]) == 4 and int(optimizer.state[ours[0]]["step"]) == 6


def test_step_hooks_run_and_zero_grad_drops_the_gradients():
    ours, _ = twin_params(2)
    optimizer = adam(ours, 1e-3)
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(steps_taken(opt)))
    for _ in range(3):
        set_grads(ours, [torch.ones_like(p) for p in ours])
        optimizer.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in ours)
    assert calls == [1, 2, 3]


def test_pre_hooks_global_hooks_and_the_profiler_see_each_step_and_steps_without_them_skip_the_wrapper(monkeypatch):
    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")  # read when the profiler first starts: quiet, as offprune's own use
    ours, _ = twin_params(4)
    optimizer = adam(ours, 1e-3)
    seen = []
    pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    glob = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append("global"))
    try:
        set_grads(ours, [torch.ones_like(p) for p in ours])
        optimizer.step()
    finally:
        pre.remove()
        glob.remove()
    assert seen == ["pre", "global"]
    set_grads(ours, [torch.ones_like(p) for p in ours])
    with torch.profiler.profile() as profile:
        optimizer.step()
    assert "Optimizer.step#FusedAdam.step" in {event.name for event in profile.events()}
    # without hooks or the profiler, torch's wrapper (and its profiler range) is not entered
    set_grads(ours, [torch.ones_like(p) for p in ours])
    calls = []
    original = FusedAdam._hooked_step
    FusedAdam._hooked_step = lambda self, closure=None: calls.append(1)
    try:
        optimizer.step()
    finally:
        FusedAdam._hooked_step = original
    assert calls == [] and steps_taken(optimizer) == 3


def test_two_threads_step_the_parameters_in_two_halves_with_torchs_bits():
    import pytest

    from conftest import repeat_until_a_helper_runs
    from offprune import native
    from offprune.sparse import sparse_threads

    ext = native.chain_kernels()
    if ext is None:
        pytest.skip("no compiled library")
    torch.manual_seed(3)
    shapes = [(300, 40), (7,), (40, 300), (1000,), (3,), (5, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer, reference = adam(ours, 1e-3), torch.optim.Adam(theirs, lr=1e-3, fused=True)

    with sparse_threads(2):
        repeat_until_a_helper_runs(ext, lambda: step_both(optimizer, reference, ours, theirs))  # a helper stepped its half
    assert all(same_bits(a, b) for a, b in zip(ours, theirs))
    for a, b in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq"):
            assert same_bits(optimizer.state[a][key], reference.state[b][key])
