package tensor

import "fmt"

// Spec declares one input or output of a model: its name, OIP datatype and
// shape, where -1 marks a free dimension (usually the batch). Its JSON form
// is the one OIP model metadata and bundle manifests use.
type Spec struct {
	Name     string  `json:"name"`
	Datatype string  `json:"datatype"`
	Shape    []int64 `json:"shape"`
}

// Check reports whether t fits s: same name, same datatype, same rank, and
// every fixed dimension equal.
func (s Spec) Check(t Tensor) error {
	if t.Name != s.Name {
		return fmt.Errorf("%w: tensor %q does not match spec %q", ErrInvalid, t.Name, s.Name)
	}
	if t.DType.String() != s.Datatype {
		return fmt.Errorf("%w: tensor %q is %s, want %s", ErrInvalid, t.Name, t.DType, s.Datatype)
	}
	if !s.ShapeMatches(t.Shape) {
		return fmt.Errorf("%w: tensor %q has shape %v, want %v (-1 = any size)", ErrInvalid, t.Name, t.Shape, s.Shape)
	}
	return nil
}

// ShapeMatches reports whether shape has s's rank and agrees with every
// dimension of s that is not -1.
func (s Spec) ShapeMatches(shape []int64) bool {
	if len(shape) != len(s.Shape) {
		return false
	}
	for i, d := range s.Shape {
		if d >= 0 && shape[i] != d {
			return false
		}
	}
	return true
}

// Validate checks the spec itself: a name, a known datatype, and dimensions
// that are -1 or >= 0.
func (s Spec) Validate() error {
	if s.Name == "" || len(s.Name) > MaxNameLen {
		return fmt.Errorf("%w: spec name must be 1 to %d bytes", ErrInvalid, MaxNameLen)
	}
	if _, err := ParseDType(s.Datatype); err != nil {
		return fmt.Errorf("spec %q: %w", s.Name, err)
	}
	if len(s.Shape) > MaxRank {
		return fmt.Errorf("%w: spec %q has rank %d, over the limit of %d", ErrInvalid, s.Name, len(s.Shape), MaxRank)
	}
	for _, d := range s.Shape {
		if d < -1 {
			return fmt.Errorf("%w: spec %q has dimension %d; use -1 for a free dimension", ErrInvalid, s.Name, d)
		}
	}
	return nil
}

// CheckAll matches a list of tensors against a list of specs by name: every
// spec must be present exactly once and nothing else may be.
func CheckAll(specs []Spec, ts []Tensor, what string) error {
	if len(ts) != len(specs) {
		return fmt.Errorf("%w: %d %s tensors, want %d (%s)", ErrInvalid, len(ts), what, len(specs), specNames(specs))
	}
	for _, s := range specs {
		found := false
		for _, t := range ts {
			if t.Name == s.Name {
				if err := s.Check(t); err != nil {
					return err
				}
				found = true
				break
			}
		}
		if !found {
			return fmt.Errorf("%w: %s tensor %q is missing (want %s)", ErrInvalid, what, s.Name, specNames(specs))
		}
	}
	return nil
}

func specNames(specs []Spec) string {
	s := ""
	for i, sp := range specs {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%s %s%v", sp.Name, sp.Datatype, sp.Shape)
	}
	return s
}
