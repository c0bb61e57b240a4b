"""SFT: the student's own next-token cross-entropy, no teacher.

The reference every distillation method must beat under the same budget. With the teacher's own
tokenizer it is also how ``ctdbench`` pretrains the teacher.
"""

from __future__ import annotations

from ctdbench.kernels import token_cross_entropy
from methods import register
from methods.base import DistillationMethod


@register("sft")
class SFT(DistillationMethod):
    needs_teacher = False

    def loss(self, batch, student_out, teacher_out):
        ce = token_cross_entropy(
            student_out.logits, batch["student_input_ids"], batch["student_loss_mask"]
        )
        return ce, {"ce": ce.item()}
