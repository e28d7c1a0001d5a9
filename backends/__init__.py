"""dsc.backends"""
