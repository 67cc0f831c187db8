"""Unsupervised domain adaptation on the digit benchmarks: Source only, DANN, ADDA, domain
confusion, CoGAN, on one shared encoder/classifier per task (see lowrank.da.methods), and the
benchmark against the ADDA paper's table: python -m lowrank.da.bench. Label-free selection of a
method's settings by reverse validation: python -m lowrank.da.select."""

from lowrank.da.methods import ADDA, DANN, METHODS, CoGAN, DAMethod, DomainConfusion, SourceOnly, make_method
from lowrank.da.models import NETWORKS, Classifier, Discriminator, LeNetEncoder, build_network
from lowrank.da.tasks import FRAMINGS, TASKS, Task, TaskData, get_task, load_task_data, make_loader

__all__ = [
    "DAMethod", "SourceOnly", "DANN", "ADDA", "DomainConfusion", "CoGAN", "METHODS", "make_method",
    "LeNetEncoder", "Classifier", "Discriminator", "NETWORKS", "build_network",
    "Task", "TASKS", "FRAMINGS", "TaskData", "get_task", "load_task_data", "make_loader",
]
