"""The hospital side: ClientApp, local DP training, privacy accounting, hospital CLI."""
