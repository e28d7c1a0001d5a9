"""dsc.frontends"""
