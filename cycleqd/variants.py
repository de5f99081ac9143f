"""Registries of the search's interchangeable parts: the mutation, the crossover, the parent
sampling and the final model's method.

Each part is a family of variants. A variant is one class: its `options` (a pydantic model
whose tag field, a one-value `Literal`, names the variant in the campaign config) and the code
that the engine calls for it. The config's field for a family is the discriminated union of
its variants' options, so another variant's option is an error that says whose it is, and a
new variant needs no change anywhere but its own class (see docs/adding_a_variant.md).

Options are plain pydantic models (no torch): a config validates anywhere.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Generic, TypeVar, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Tag


class VariantOptions(BaseModel):
    """The options of one variant: unknown fields are errors, values frozen and finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Variant(ABC):
    """A variant of a family; subclasses set `options`, the model of their config entry (a
    subclass that misses an abstract method fails when it is registered)."""

    options: ClassVar[type[VariantOptions]]


V = TypeVar("V", bound=Variant)


class Registry(Generic[V]):
    """The variants of one family, in the order they were registered, by their tag."""

    def __init__(self, family: str, tag: str, default: str) -> None:
        """`family`: the config field (`mutation`); `tag`: the field naming the variant
        (`kind`); `default`: the variant used when the config does not name one."""
        self.family = family
        self.tag = tag
        self.default = default
        self._variants: dict[str, V] = {}

    def register(self, cls: type[V]) -> type[V]:
        """Class decorator: registers one instance of `cls` under its options' tag."""
        field = cls.options.model_fields.get(self.tag)
        literal = get_args(field.annotation) if field is not None else ()
        if len(literal) != 1 or field.default != literal[0]:
            raise TypeError(
                f"{cls.__name__}.options needs `{self.tag}: Literal[name] = name` "
                f"to be a {self.family} variant"
            )
        name = literal[0]
        if name in self._variants:
            raise TypeError(f"{self.family} {name!r} is registered twice")
        self._variants[name] = cls()
        return cls

    def copy(self) -> Registry[V]:
        """A registry with the same variants, to register more without changing this one."""
        clone: Registry[V] = Registry(self.family, self.tag, self.default)
        clone._variants = dict(self._variants)
        return clone

    def __getitem__(self, name: str) -> V:
        try:
            return self._variants[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.family} {self.tag} {name!r}; allowed: {self.allowed()}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def __iter__(self) -> Iterator[str]:
        return iter(self._variants)

    def names(self) -> tuple[str, ...]:
        return tuple(self._variants)

    def allowed(self) -> str:
        """The names as a config error lists them: 'a', 'b' or 'c'."""
        quoted = [repr(n) for n in self._variants]
        return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]

    def options_of(self, name: str) -> type[VariantOptions]:
        return self[name].options

    def tag_of(self, value: Any) -> str:
        """The variant an entry names (the default when it names none)."""
        tag = (
            value.get(self.tag, self.default)
            if isinstance(value, dict)
            else getattr(value, self.tag, self.default)
        )
        return tag if isinstance(tag, str) else repr(tag)

    def config_type(self) -> Any:
        """The config field's type: the discriminated union of the variants' options."""
        if len(self._variants) == 1:
            return next(iter(self._variants.values())).options
        members = tuple(Annotated[v.options, Tag(n)] for n, v in self._variants.items())
        return Annotated[Union[members], Discriminator(self.tag_of)]  # noqa: UP007

    def default_options(self) -> VariantOptions:
        return self[self.default].options()
