"""mathtune.eval"""
