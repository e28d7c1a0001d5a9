"""dsc.passes"""
