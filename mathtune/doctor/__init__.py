"""mathtune.doctor.doctor"""
