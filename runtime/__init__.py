"""dsc.runtime"""
