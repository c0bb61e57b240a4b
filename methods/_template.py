"""<Method name>: <one-line summary> (<authors>, <arXiv id>, <official code URL @ commit>).

Copy this file to ``methods/<name>.py``, add a ``methods: {<name>: {...}}`` block and the name to
``run.methods`` in a config, and a test file ``tests/methods/test_<name>.py``. Nothing else.
Annotate every hyperparameter's type and give its allowed values in ``hparam_limits``: config
validation checks both, so a bad value fails before any job runs.

Equations implemented:
    L = CE(student) + weight * D(teacher, student)      # state every equation you implement

Deviations from the official code (each with the reason):
    - none yet.
"""

from __future__ import annotations

from ctdbench.kernels import token_cross_entropy  # shared loss kernels (ctdbench/kernels.py)
from methods import register  # noqa: F401  (uncomment @register below)
from methods.base import DistillationMethod


# @register("my_method")
class MyMethod(DistillationMethod):
    needs_teacher = True           # run the teacher on its own tokenization of the same text
    needs_hidden_states = False    # the student's last hidden state
    needs_teacher_hidden_states = False  # the teacher's last hidden state
    # Config validation checks every hyperparameter against its annotation below and these
    # limits: an interval "[lo, hi]" / "(lo, hi)" (inf allowed), a tuple of allowed values, or a
    # function returning the problem with a value (methods.base.under_results: a path it writes).
    hparam_limits = {"weight": "[0, inf)", "temperature": "(0, inf)"}

    def __init__(self, ctx, weight: float = 1.0, temperature: float = 1.0):
        super().__init__(ctx)
        self.weight = weight
        self.temperature = temperature
        # Trainable parts (heads, projectors) go here as submodules: they train with the
        # student and never enter the student checkpoint.

    def prepare(self, examples):
        # CPU work per batch (alignments, targets), vectorised; returned tensors join the batch.
        return {}

    def loss(self, batch, student_out, teacher_out):
        # Every term counts the training targets only: ``student_loss_mask`` (and the teacher's
        # ``teacher_loss_mask``), not the attention mask, which also covers chat prompts.
        ce = token_cross_entropy(
            student_out.logits, batch["student_input_ids"], batch["student_loss_mask"]
        )
        distill = ce.new_zeros(())  # replace with the method's divergence, under the same masks
        return ce + self.weight * distill, {"ce": ce.item(), "distill": distill.item()}
