// Reads a Modelfile as Ollama reads one and renders its TEMPLATE as Ollama prompts a model with it: the test's
// stand-in for `ollama create` and `ollama run`, which cannot be installed here (no Ollama release is in the
// package registries this project installs from).
//
// The Modelfile rules are Ollama's (docs/modelfile.md and its parser): one command per instruction, names in any
// case (FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER name, MESSAGE role, LICENSE, ...), `#` comments; a value is a
// bare word, a "quoted" string or a """multi-line""" string, ended by the first space or line break after which
// it is whole; values are taken as written, without escapes, and characters that are not printable are dropped
// (tabs and line breaks inside a quoted value stay). The template is Go's text/template with Ollama's options
// (missingkey=zero, the json function), executed over .System, .Messages (each .Role and .Content; consecutive
// messages of one role joined by a blank line, as Ollama collates them) and an empty .Response.
//
//	go run modelfile_check.go MODELFILE < conversation.json    ->  {"commands": [[name, value], ...], "prompt": "..."}
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/template"
	"unicode/utf8"
)

type command struct{ Name, Value string }

type message struct{ Role, Content string }

var instructions = map[string]bool{"from": true, "adapter": true, "template": true, "system": true, "parameter": true,
	"message": true, "license": true, "draft": true, "renderer": true, "parser": true, "requires": true}

// unquote: the value without its quotes, and whether it is whole (a quoted value needs its closing quotes).
func unquote(s string) (string, bool) {
	if strings.HasPrefix(s, `"""`) {
		if len(s) >= 6 && strings.HasSuffix(s, `"""`) {
			return s[3 : len(s)-3], true
		}
		return "", false
	}
	if strings.HasPrefix(s, `"`) {
		if len(s) >= 2 && strings.HasSuffix(s, `"`) {
			return s[1 : len(s)-1], true
		}
		return "", false
	}
	return s, true
}

func parse(text string) ([]command, error) {
	var commands []command
	line := 1
	rest := text
	for len(rest) > 0 {
		r, size := utf8.DecodeRuneInString(rest)
		switch {
		case r == '\n':
			line++
			rest = rest[size:]
			continue
		case r == ' ' || r == '\t' || r == '\r':
			rest = rest[size:]
			continue
		case r == '#':
			end := strings.IndexByte(rest, '\n')
			if end < 0 {
				end = len(rest)
			}
			rest = rest[end:]
			continue
		}
		name := ""
		for len(rest) > 0 && (rest[0] >= 'a' && rest[0] <= 'z' || rest[0] >= 'A' && rest[0] <= 'Z') {
			name, rest = name+rest[:1], rest[1:]
		}
		if !instructions[strings.ToLower(name)] || len(rest) == 0 || (rest[0] != ' ' && rest[0] != '\t') {
			return nil, fmt.Errorf("line %d: not an instruction: %q", line, name)
		}
		name = strings.ToLower(name)
		rest = strings.TrimLeft(rest, " \t")
		if name == "parameter" || name == "message" {
			word := ""
			for len(rest) > 0 && rest[0] != ' ' && rest[0] != '\t' && rest[0] != '\n' {
				word, rest = word+rest[:1], rest[1:]
			}
			if name == "message" && word != "system" && word != "user" && word != "assistant" {
				return nil, fmt.Errorf("line %d: message role %q", line, word)
			}
			name = word
			if word == "system" || word == "user" || word == "assistant" {
				name = "message " + word
			}
			rest = strings.TrimLeft(rest, " \t")
		}
		var value strings.Builder
		done := false
		for len(rest) > 0 && !done {
			r, size := utf8.DecodeRuneInString(rest)
			if r == ' ' || r == '\t' || r == '\n' || r == '\r' {
				if s, ok := unquote(strings.TrimSpace(value.String())); ok && value.Len() > 0 {
					commands = append(commands, command{name, s})
					done = true
					break
				}
				value.WriteRune(r)
			} else if strconv.IsPrint(r) {
				value.WriteRune(r)
			}
			if r == '\n' {
				line++
			}
			rest = rest[size:]
		}
		if !done {
			s, ok := unquote(strings.TrimSpace(value.String()))
			if !ok {
				return nil, fmt.Errorf("line %d: a quoted value is not closed", line)
			}
			commands = append(commands, command{name, s})
		}
	}
	for _, c := range commands {
		if c.Name == "from" {
			return commands, nil
		}
	}
	return nil, fmt.Errorf("no FROM line")
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(err)
	}
	commands, err := parse(string(text))
	if err != nil {
		fail(err)
	}
	var conversation []message
	if err := json.NewDecoder(os.Stdin).Decode(&conversation); err != nil {
		fail(err)
	}
	var system []string
	var collated []*message
	for i := range conversation {
		m := &conversation[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, m)
		}
	}
	prompt := ""
	for _, c := range commands {
		if c.Name != "template" {
			continue
		}
		funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
		tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Value)
		if err != nil {
			fail(err)
		}
		var out strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Response": ""}
		if err := tmpl.Execute(&out, data); err != nil {
			fail(err)
		}
		prompt = out.String()
	}
	pairs := [][2]string{}
	for _, c := range commands {
		pairs = append(pairs, [2]string{c.Name, c.Value})
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"commands": pairs, "prompt": prompt})
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "modelfile:", err)
	os.Exit(2)
}
