"""Exact, matrix-free curvature for JAX + Equinox + Optax."""

from ._cg import CGResult as CGResult, CGStop as CGStop, cg as cg
from ._diagnostics import GaussNewtonWarning as GaussNewtonWarning
from ._estimators import (
    exact_diagonal as exact_diagonal,
    hutchinson_diagonal as hutchinson_diagonal,
    hutchinson_trace as hutchinson_trace,
    spectral_density as spectral_density,
    top_eigenvalues as top_eigenvalues,
)
from ._ggn import (
    create_empirical_fisher_mv as create_empirical_fisher_mv,
    create_fisher_mv as create_fisher_mv,
    create_ggn_mv as create_ggn_mv,
    create_ggn_mv_without_data as create_ggn_mv_without_data,
    create_hessian_mv as create_hessian_mv,
)
from ._grafted_kfac import (
    grafted_kfac as grafted_kfac,
    scale_by_kfac as scale_by_kfac,
)
from ._grafting import (
    scale_by_grafting as scale_by_grafting,
)
from ._kfac import (
    KFACState as KFACState,
    KroneckerFactor as KroneckerFactor,
    kfac_factors as kfac_factors,
    kfac_inverse as kfac_inverse,
)
from ._losses import (
    binary_cross_entropy_loss as binary_cross_entropy_loss,
    create_loss_hessian_mv as create_loss_hessian_mv,
    cross_entropy_loss as cross_entropy_loss,
    identity_loss as identity_loss,
    mse_loss as mse_loss,
)
from ._monitor import (
    CurvatureMetrics as CurvatureMetrics,
    CurvatureMonitor as CurvatureMonitor,
    MonitorCurvatureState as MonitorCurvatureState,
    monitor_curvature as monitor_curvature,
)
from ._operator import (
    CurvatureOperator as CurvatureOperator,
    curvature_operator as curvature_operator,
    value_and_grad as value_and_grad,
)
from ._optimizer import (
    ScaleByGaussNewtonState as ScaleByGaussNewtonState,
    gauss_newton as gauss_newton,
    scale_by_gauss_newton as scale_by_gauss_newton,
)
from ._partition import as_model_fn as as_model_fn, partition as partition
from ._plot import (
    plot_curvature_history as plot_curvature_history,
    plot_spectral_density as plot_spectral_density,
)
from ._step_control import StepRejection as StepRejection


__version__ = "0.1.0"
