"""World size 4 against one process on the concatenated batch: the losses of DIM, AMDIM, CPC and CMC (the
global batch's keys, and its memory bank), value and gradients, with each test file's own world-size-2
helpers. One spawn checks them all, so the 4 ranks pay their imports once (~9 s each on 2 cores)."""

import pytest
import torch
import torch.distributed as dist

import test_amdim
import test_cmc
import test_cmc_memory_bank
import test_cpc
import test_dim
from distributed_utils import spawn

WORLD = 4


def _compare_all(rank, world, expected):
    test_dim._compare_on_ranks(rank, world, expected["dim"])
    test_amdim._compare_on_ranks(rank, world, expected["amdim"])
    test_cpc._compare_on_ranks(rank, world, expected["cpc"])
    test_cmc.assert_gradients_match(test_cmc.one_step_gradients(rank, world), expected["cmc"])
    step = test_cmc_memory_bank.one_step(rank, world)
    test_cmc_memory_bank.assert_step_matches(step, expected["cmc_memory_bank"])
    banks = [torch.empty_like(step["rows"]) for _ in range(world)]
    dist.all_gather(banks, step["rows"])
    assert all(torch.equal(bank, banks[0]) for bank in banks), "the ranks' memory banks differ"


@pytest.mark.slow  # ~25 s on 2 cores: 4 ranks importing timm and the methods
def test_four_ranks_equal_one_process_on_the_concatenated_batch():
    expected = {"dim": test_dim.expected_on_one_process(), "amdim": test_amdim.expected_on_one_process(),
                "cpc": test_cpc._loss_and_grads(0, 1), "cmc": test_cmc.one_step_gradients(),
                "cmc_memory_bank": test_cmc_memory_bank.one_step()}
    spawn(_compare_all, WORLD, expected, timeout=120)
