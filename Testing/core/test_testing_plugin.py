"""The test plugin's own promises (Testing/ctfm_testing/plugin.py) that other tests' speed depends on."""

import torch

from CTFMLib.runtime import Runner, RunOptions


def test_a_runner_with_one_thread_leaves_torch_on_one_thread():
    """What the next test undoes: a command run in this process with `--threads 1` (a Runner with one thread)
    sets torch's thread count for the whole process."""
    Runner(torch.nn.Identity(), RunOptions(device="cpu", threads=1))
    assert torch.get_num_threads() == 1


def test_the_next_test_runs_with_torch_s_own_thread_count_again():
    """Runs after the one above (file order): torch is back to its own choice, not stuck on one core."""
    from ctfm_testing import plugin

    assert plugin.TORCH_THREADS, "the plugin read torch's thread count at the start of the session"
    assert torch.get_num_threads() == plugin.TORCH_THREADS[0]
