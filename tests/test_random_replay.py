"""RandomReplay: a part's random draws are the full batch's, cut to its samples."""

import torch

from envs.runtime.random_replay import RandomReplay


def test_a_part_gets_its_samples_of_each_draw_and_a_shared_draw_whole():
    replay = RandomReplay()
    with replay:
        replay.record()
        per_sample, shared = torch.rand(4, 1), torch.randn(3)
        filled = torch.empty(4, 2).bernoulli_(0.5)
        replay.replay(1, 2)
        part = (torch.rand(2, 1), torch.randn(3), torch.empty(2, 2).bernoulli_(0.5))
    torch.testing.assert_close(part[0], per_sample[2:])
    torch.testing.assert_close(part[1], shared)
    torch.testing.assert_close(part[2], filled[2:])
    assert (replay.replayed, replay.missed) == (3, 0)


def test_a_draw_whose_values_depend_on_its_length_or_shape_is_drawn_afresh_and_counted():
    replay = RandomReplay()
    with replay:
        replay.record()
        torch.randperm(8)
        torch.rand(4, 6)
        replay.replay(0, 2)
        assert sorted(torch.randperm(4).tolist()) == [0, 1, 2, 3]
        assert torch.rand(4, 5).shape == (4, 5)  # not a cut of (4, 6)
        torch.rand(2)  # a third draw the full batch did not make
    assert (replay.replayed, replay.missed) == (0, 3)
