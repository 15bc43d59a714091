"""Forecasting family: recurrent and MLP regressors of numeric series (issue 16), trained on lm.loop."""
