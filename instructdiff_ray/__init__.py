"""instructdiff_ray: InstructDiff data selection (differential entropy) as a Ray batch job."""

__version__ = "0.1.0"
