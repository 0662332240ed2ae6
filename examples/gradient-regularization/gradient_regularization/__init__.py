"""Input gradient regularization (Ross & Doshi-Velez 2018), as a robustmatrix defense plugin."""
