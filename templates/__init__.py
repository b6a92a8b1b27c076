"""The shipped client-script templates, installed as the package data of deployer.templates."""
