import numpy as np

from pipeline.evaluate.metrics import confusion, per_class_table, summary_metrics


def _by_hand(y, p, k):
    """Independent macro/weighted P/R/F1 from raw counts (zero when undefined)."""
    prec, rec, f1, sup = [], [], [], []
    for c in range(k):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        pc = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        (
            prec.append(pc),
            rec.append(rc),
            f1.append(2 * pc * rc / (pc + rc) if pc + rc else 0.0),
            sup.append(np.sum(y == c)),
        )
    w = np.array(sup) / len(y)
    return np.mean(prec), np.mean(rec), np.mean(f1), float(np.dot(w, f1)), prec


def test_summary_metrics_match_an_independent_computation():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    p[p == 3] = 2  # class 3 never predicted: precision undefined -> 0
    m = summary_metrics(y, p, 4, "test")
    mp, mr, mf, wf, prec = _by_hand(y, p, 4)
    assert np.isclose(m["test_accuracy"], np.mean(y == p))
    assert np.isclose(m["test_precision_macro"], mp)
    assert np.isclose(m["test_recall_macro"], mr)
    assert np.isclose(m["test_f1_macro"], mf)
    assert np.isclose(m["test_f1_weighted"], wf)
    table = per_class_table(y, p, ["a", "b", "c", "d"])
    assert np.allclose(table["precision"], prec)
    assert table["support"].sum() == 200


def test_confusion_has_every_class_even_if_absent():
    cm = confusion(np.array([0, 1]), np.array([0, 0]), 3)
    assert cm.shape == (3, 3) and cm[1, 0] == 1 and cm.sum() == 2
