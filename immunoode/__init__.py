"""immunoode: mechanistic ODE / PK-PD models of the cancer-immunity cycle.

Data flow: model (:mod:`.model`, :mod:`.modelfile`, :mod:`.sbml`) → compile
(:mod:`.compile`) → simulate (:mod:`.simulate`, :mod:`.population`) → virtual patients
(:mod:`.sampling`) → response (:mod:`.recist`, :mod:`.resistance`) → trial arms
(:mod:`.trial`, :mod:`.trialstats`, :mod:`.plots`) → calibration (:mod:`.calibrate`)
→ scenario sweeps (:mod:`.sweep`) → results (xarray).
"""

from ._version import __version__
from .compile import CompiledModel, compile_model
from .errors import ExpressionError, ImmunoodeError, ModelError, RegimenError, SimulationError, UnitError
from .model import Model, ModelBuilder
from .modelfile import load_model, loads_model
from .regimen import Dose, Regimen, Scale, load_regimen
from .population import simulate_population
from .sbml import read_sbml, read_sbml_triggered, read_sbml_with_regimen, to_sbml
from .triggered import Event, TriggeredModel, simulate_triggered
from .response import assess_response
from .sampling import sample_population
from .simulate import simulate, time_grid
from .trial import open_trial, run_trial, summary_table
from .lesions import Lesion, multi_lesion_model
from .sensitivity import simulate_sensitivities

__all__ = [
    "__version__", "CompiledModel", "compile_model", "ExpressionError", "ImmunoodeError",
    "ModelError", "RegimenError", "SimulationError", "UnitError", "Model", "ModelBuilder",
    "load_model", "loads_model", "simulate_population", "Dose", "Regimen", "Scale", "load_regimen", "simulate",
    "time_grid", "read_sbml", "read_sbml_with_regimen", "to_sbml", "sample_population",
    "assess_response", "run_trial", "summary_table", "open_trial", "Lesion",
    "multi_lesion_model", "simulate_sensitivities", "read_sbml_triggered", "Event",
    "TriggeredModel", "simulate_triggered",
]
