"""Mergeable operators (sketches). Each module holds one algorithm family."""

from streamattn.operators.frequent_directions import FDSketch, FDSpec, FrequentDirections
from streamattn.operators.leverage import LeverageScores, LeverageSpec, TopScores, TopScoresSpec
from streamattn.operators.protocol import Operator, RowRanges, State

__all__ = [
    "FDSketch",
    "FDSpec",
    "FrequentDirections",
    "LeverageScores",
    "LeverageSpec",
    "Operator",
    "RowRanges",
    "State",
    "TopScores",
    "TopScoresSpec",
]
