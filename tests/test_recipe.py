"""Run assembly (``ctdbench.recipe``) and the one constructor of a method's context."""

import pytest

from ctdbench import recipe
from ctdbench.data import Side
from methods.base import MethodContext


def test_method_context_from_sides(sides):
    student, teacher = sides
    ctx = MethodContext.from_sides(None, None, student, teacher, teacher_top_k=8)
    assert ctx.student_token_bytes is student.token_bytes and ctx.teacher_token_bytes is teacher.token_bytes
    assert not ctx.same_tokenizer and ctx.teacher_top_k == 8
    assert ctx.student_special_ids == list(student.tokenizer.all_special_ids)
    assert ctx.teacher_special_ids == list(teacher.tokenizer.all_special_ids)
    # Teacher pretraining: no teacher side, the student's own tokenizer on both.
    alone = MethodContext.from_sides(None, None, student)
    assert alone.same_tokenizer and alone.teacher_token_bytes is student.token_bytes
    assert alone.teacher_special_ids == alone.student_special_ids and alone.teacher_top_k is None
    # The same vocabulary loaded twice is the same tokenizer.
    assert MethodContext.from_sides(None, None, student, Side(student.tokenizer, list(student.token_bytes))).same_tokenizer


def test_a_top_k_spec_without_its_cache_is_refused(sides):
    with pytest.raises(ValueError, match="top-8 teacher cache"):
        recipe.assemble({"teacher_cache_top_k": 8}, "unused", *sides, None, "cpu", method_name="kd", hparams={},
                        model_spec={})
