"""The Pulumi program's entry point (Pulumi.yaml: runtime python).

Only imports and runs `controller.pulumi_program.program()`, the very function the
Automation API driver (`controller.drivers.pulumi`) runs, so `pulumi up` and
`autodeploy serve --driver pulumi` can never disagree about what a stack contains.
"""
from controller.pulumi_program import program

program()
