"""Distillation losses against values computed by hand (not by the code under test).

Each expected value is written out as numbers; next to it, the values that plausible wrong
implementations give (no padding mask, a term dropped, no T^2, ...) are shown to be clearly
different (by more than 10%), so an implementation with such a mistake cannot pass.
"""

import math

import pytest
import torch

from autotinybert.pretrain import kd_loss
from autotinybert.tasks.finetune import FinetuneSettings, task_loss
from autotinybert.tasks.glue import glue_task
from autotinybert.tasks.squad import squad_task


def _differs_clearly(expected: float, *wrong: float) -> None:
    """Each wrong value is >10% off: far outside assert_close's tolerance (~1e-6 relative)."""
    for value in wrong:
        assert abs(value - expected) > 0.1 * abs(expected), (expected, value)


# --- pre-training KD (AutoTinyBERT-KD: last-layer attention scores + fitted last hidden state) ---
def _kd_example():
    """Batch 2, 2 heads, 3 tokens; sequence 1 has 2 real tokens and one pad.

    The student is the teacher plus a known offset, so each squared error is a chosen number:
    attention scores differ by (b+1)*(h+1) on real (query, key) pairs, hidden states by
    [1, 2, 3] (sequence 0) and [2, 2] (sequence 1) per token, in both of 2 features; every entry
    that touches a pad is off by 10, so including padding would show.
    """
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    teacher_scores = torch.randn(2, 2, 3, 3, generator=gen)
    offset = torch.full((2, 2, 3, 3), 10.0)
    for b, real in enumerate((3, 2)):
        for h in range(2):
            offset[b, h, :real, :real] = (b + 1) * (h + 1)
    teacher_hidden = torch.randn(2, 3, 2, generator=gen)
    hidden_offset = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 10.0]])[:, :, None].expand(2, 3, 2)
    return teacher_scores + offset, teacher_scores, teacher_hidden + hidden_offset, teacher_hidden, mask


def test_kd_loss_is_masked_mean_score_error_plus_masked_mean_hidden_error():
    student_scores, teacher_scores, student_fit, teacher_hidden, mask = _kd_example()
    # attention: sequence 0, 9 real pairs per head, errors 1^2 and 2^2; sequence 1, 4 real pairs
    # per head, errors 2^2 and 4^2: (9*1 + 9*4 + 4*4 + 4*16) / (18 + 8) = 125 / 26
    attention = 125 / 26
    # hidden: real tokens only, 2 features each: 2*(1 + 4 + 9) + 2*(4 + 4) = 44 over 10 entries
    hidden = 44 / 10
    expected = attention + hidden
    got = kd_loss(student_scores, teacher_scores, student_fit, teacher_hidden, mask)
    torch.testing.assert_close(got, torch.tensor(expected))

    # What wrong implementations would return instead (all far from `expected`):
    no_mask = (45 + (4 * 4 + 5 * 100) + (4 * 16 + 5 * 100)) / 36 + (44 + 2 * 100) / 12
    keys_only_masked = (45 + (4 * 4 + 2 * 100) + (4 * 16 + 2 * 100)) / 30 + hidden  # pad query rows kept
    per_sequence_mean = (45 / 18 + 80 / 8) / 2 + hidden
    _differs_clearly(expected, attention, hidden, no_mask, keys_only_masked, per_sequence_mean)


def test_kd_loss_padding_content_is_ignored():
    student_scores, teacher_scores, student_fit, teacher_hidden, mask = _kd_example()
    base = kd_loss(student_scores, teacher_scores, student_fit, teacher_hidden, mask)
    padded = mask == 0  # (B, T)
    student_scores = student_scores.clone()
    student_scores[1, :, 2, :] += 1000.0  # the pad as query
    student_scores[1, :, :, 2] -= 1000.0  # the pad as key
    student_fit = student_fit.masked_fill(padded[:, :, None], 1000.0)
    torch.testing.assert_close(kd_loss(student_scores, teacher_scores, student_fit, teacher_hidden, mask), base)


# --- fine-tuning: hard labels mixed with the teacher's soft targets (Hinton et al. 2015) ---------
def _softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _cross_entropy(rows, targets):
    return sum(-math.log(_softmax(row)[y]) for row, y in zip(rows, targets)) / len(rows)


def _kl(teacher_rows, student_rows, t):
    """KL(teacher || student) of temperature-t distributions, summed over classes, mean over rows."""
    total = 0.0
    for t_row, s_row in zip(teacher_rows, student_rows):
        p, q = _softmax(t_row, t), _softmax(s_row, t)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(teacher_rows)


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[3.0, -1.0, 1.0], [2.0, 0.0, -2.0]]
LABELS = [1, 2]


def test_finetune_classification_loss_mixes_cross_entropy_and_tempered_kl():
    alpha, t = 0.25, 3.0
    settings = FinetuneSettings(kd_alpha=alpha, kd_temperature=t)
    batch = {"labels": torch.tensor(LABELS)}
    got = task_loss(glue_task("mnli"), (torch.tensor(STUDENT),), batch, (torch.tensor(TEACHER),), settings)

    hard = _cross_entropy(STUDENT, LABELS)
    soft = _kl(TEACHER, STUDENT, t) * t * t  # T^2 keeps the soft gradients' scale (Hinton et al.)
    expected = alpha * soft + (1 - alpha) * hard
    torch.testing.assert_close(got, torch.tensor(expected))

    _differs_clearly(
        expected,
        hard,                                                     # teacher ignored
        soft,                                                     # labels ignored
        alpha * soft / (t * t) + (1 - alpha) * hard,              # no T^2
        alpha * _kl(STUDENT, TEACHER, t) * t * t + (1 - alpha) * hard,  # KL the wrong way round
        alpha * soft / 3 + (1 - alpha) * hard,                    # mean over classes too
        (1 - alpha) * soft + alpha * hard,                        # alpha on the wrong term
        alpha * _kl(TEACHER, STUDENT, 1.0) + (1 - alpha) * hard,  # temperature ignored
    )
    # without a teacher: plain cross-entropy
    torch.testing.assert_close(task_loss(glue_task("mnli"), (torch.tensor(STUDENT),), batch, None, settings),
                               torch.tensor(hard))


def test_finetune_regression_loss_mixes_label_and_teacher_mse():
    alpha = 0.25
    settings = FinetuneSettings(kd_alpha=alpha, kd_temperature=3.0)
    student, teacher, labels = [[0.5], [2.0]], [[1.5], [0.0]], [0.0, 3.0]
    got = task_loss(glue_task("stsb"), (torch.tensor(student),), {"labels": torch.tensor(labels)},
                (torch.tensor(teacher),), settings)
    hard = ((0.5 - 0.0) ** 2 + (2.0 - 3.0) ** 2) / 2     # 0.625
    soft = ((0.5 - 1.5) ** 2 + (2.0 - 0.0) ** 2) / 2     # 2.5: no temperature for regression
    expected = alpha * soft + (1 - alpha) * hard
    torch.testing.assert_close(got, torch.tensor(expected))
    _differs_clearly(expected, hard, (1 - alpha) * soft + alpha * hard, expected * 9)  # 9: a stray T^2


def test_finetune_squad_loss_averages_start_and_end_with_a_padded_sequence():
    """SQuAD: start and end each mix CE and KD, then the two are averaged. Sequence 1 has a pad
    (last position); like BertForQuestionAnswering's loss, no mask is applied to the logits."""
    alpha, t = 0.5, 2.0
    settings = FinetuneSettings(kd_alpha=alpha, kd_temperature=t)
    student_start = [[0.0, 2.0, 1.0, -1.0], [1.0, 0.5, -0.5, 0.0]]
    student_end = [[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 1.0, 0.0]]
    teacher_start = [[0.0, 3.0, 0.0, -2.0], [2.0, 0.0, 0.0, 0.0]]
    teacher_end = [[0.0, 0.0, 4.0, -1.0], [0.0, 3.0, 0.0, 0.0]]
    starts, ends = [1, 0], [2, 1]
    batch = {"start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}
    got = task_loss(squad_task("squad"), (torch.tensor(student_start), torch.tensor(student_end)), batch,
                (torch.tensor(teacher_start), torch.tensor(teacher_end)), settings)

    def mixed(student, teacher, targets):
        return alpha * _kl(teacher, student, t) * t * t + (1 - alpha) * _cross_entropy(student, targets)

    start, end = mixed(student_start, teacher_start, starts), mixed(student_end, teacher_end, ends)
    expected = (start + end) / 2
    torch.testing.assert_close(got, torch.tensor(expected))
    _differs_clearly(expected, start + end, start, end)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_finetune_kd_alpha_endpoints(alpha):
    """alpha 0: labels only; alpha 1: teacher only."""
    t = 3.0
    settings = FinetuneSettings(kd_alpha=alpha, kd_temperature=t)
    got = task_loss(glue_task("mnli"), (torch.tensor(STUDENT),), {"labels": torch.tensor(LABELS)},
                (torch.tensor(TEACHER),), settings)
    expected = _kl(TEACHER, STUDENT, t) * t * t if alpha == 1.0 else _cross_entropy(STUDENT, LABELS)
    torch.testing.assert_close(got, torch.tensor(expected))
