"""Drivers act on instances (processes, containers, Pulumi stacks); they never decide."""
