"""scikit-learn's own estimator checks, against every psctl estimator.

Each check fits the estimator (hundreds of fits in all), so the estimators run with
``in_process=True``: the embedded cluster's coordinator, shard and worker as tasks of
the test's process on loopback TCP (the same services a user gets with that parameter),
not a second of process start-up per fit.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn", reason="the estimator checks need scikit-learn: pip install 'psctl[sklearn]'")

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from psctl.sklearn import (  # noqa: E402
    PSLinearRegression,
    PSLinearSVC,
    PSLogisticRegression,
    PSMatrixFactorization,
    PSSoftmaxRegression,
)

SMALL = {"workers": 1, "shards": 1, "in_process": True}

ESTIMATORS = [
    PSLogisticRegression(**SMALL),
    PSSoftmaxRegression(**SMALL),
    PSLinearSVC(**SMALL),
    PSLinearRegression(**SMALL),
    PSMatrixFactorization(**SMALL),
]


# Checks written for estimators on feature matrices: each passes X of 1, 4, 5 or 10
# columns (features), and a matrix factorization's rows are (user id, item id) pairs, or
# 3 columns with the rating; it refuses any other width with one sentence. Every other
# check runs against PSMatrixFactorization too (1-d, empty, complex, NaN/inf, sparse input,
# pickling, cloning, idempotent fits, ...).
_NOT_ID_PAIRS = "passes X of feature columns (not 2); mf rows are (user, item) id pairs"
MF_NOT_APPLICABLE = {
    name: _NOT_ID_PAIRS
    for name in (
        "check_n_features_in_after_fitting",  # X with 4 columns
        "check_positive_only_tag_during_fit",  # 4 columns
        "check_estimators_dtypes",  # 5 columns
        "check_dtype_object",  # 10 columns
        "check_regressors_train",  # 10 columns (each of its variants)
        "check_regressor_data_not_an_array",  # 10 columns
        "check_regressors_no_decision_function",  # 10 columns
        "check_regressors_int",  # 10 columns
        "check_fit2d_1sample",  # 10 columns
        "check_fit2d_1feature",  # 1 column
    )
}


def expected_failed(estimator):
    return MF_NOT_APPLICABLE if isinstance(estimator, PSMatrixFactorization) else {}


pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed)
def test_sklearn_check(estimator, check):
    check(estimator)
