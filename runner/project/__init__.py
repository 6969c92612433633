"""Project files: schema, loading, validation and error reports. Imports neither torch nor rich."""

from runner.project.adapter_checks import adapter_ranks
from runner.project.load import Problem, ProjectError, load_project
from runner.project.schema import Blend, Prior, Project, Render, Subject

__all__ = [
    "Blend",
    "Prior",
    "Problem",
    "Project",
    "ProjectError",
    "Render",
    "Subject",
    "adapter_ranks",
    "load_project",
]
