"""deployer: upgrade the client script on SSHReach hosts without ever losing a host."""

__version__ = "0.1.0"
