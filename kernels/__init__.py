"""Triton kernels, installed as lowrank.kernels. Importing a submodule imports triton."""
