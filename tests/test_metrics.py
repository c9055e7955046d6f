import numpy as np
import pytest

from parnn.metrics import accuracy, confusion_matrix, format_report, per_class_accuracy

Y_TRUE = [0, 0, 1, 1, 1, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert cm.tolist() == [[1, 1, 0, 0],
                           [1, 2, 0, 0],
                           [0, 0, 1, 0],
                           [0, 0, 0, 0]]
    assert cm.sum() == len(Y_TRUE)


def test_confusion_matrix_rejects_out_of_range_and_mismatch():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, -1], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)


def test_accuracy():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert accuracy(np.array([1, 2]), np.array([1, 2])) == 1.0
    assert np.isnan(accuracy([], []))


def test_per_class_accuracy_nan_for_empty_class():
    with np.errstate(all="raise"):  # no divide-by-zero warning for the empty class
        r = per_class_accuracy(confusion_matrix(Y_TRUE, Y_PRED, 4))
    assert r[:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(r[3])


def test_report_contains_names_and_numbers():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 4)
    names = ["T-shirt/top", "Trouser", "Pullover", "Ankle boot"]
    text = format_report(cm, names)
    assert "0.6667" in text and "(4/6)" in text
    for n in names:
        assert n in text
    assert "nan" in text  # the empty class
    with pytest.raises(ValueError):
        format_report(cm, names[:2])


def test_precision_recall_f1_by_hand():
    from parnn.metrics import macro_average, precision_recall_f1

    # class 0: predicted twice (once right), 2 samples; class 1: predicted 3 times (2 right),
    # 3 samples; class 2: 1 of 1; class 3: never predicted, no samples
    precision, recall, f1 = precision_recall_f1(confusion_matrix(Y_TRUE, Y_PRED, 4))
    assert precision[:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(precision[3])
    assert recall[:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(recall[3])
    assert f1[:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(f1[3])
    # precision differs from recall when a class takes another's samples
    p, r, f = precision_recall_f1(confusion_matrix([0, 0, 0, 1], [0, 1, 1, 1], 2))
    assert p.tolist() == [1.0, 1 / 3] and r.tolist() == [1 / 3, 1.0]
    assert f.tolist() == pytest.approx([2 * (1 / 3) / (4 / 3), 2 * (1 / 3) / (4 / 3)])
    assert macro_average([0.5, np.nan, 1.0]) == 0.75


def test_report_has_precision_recall_and_f1():
    cm = confusion_matrix([0, 0, 0, 1], [0, 1, 1, 1], 2)
    text = format_report(cm, ["a", "b"])
    assert "precision" in text and "F1" in text and "macro average" in text
    assert "0.3333" in text and "0.5000" in text
