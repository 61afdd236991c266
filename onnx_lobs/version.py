"""The package version, in its own module so that any module can read it without importing the
package root (which imports everything)."""

__version__ = "0.3.0"
