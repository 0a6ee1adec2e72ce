"""The built-in calibration text of `qlorakit inspect --calibration-tokens N`: short plain English, written for
qlorakit, mixing what a chat model reads (explanations, instructions, a conversation, numbers, a little code) so
that every linear sees ordinary inputs. About 1,150 tokens with the bundled model's tokenizer; `--calibration-data
FILE` gives more."""

CALIBRATION_TEXT = """\
How a kettle knows when to stop. Most electric kettles have no computer inside. Under the base sits a small disc \
made of two metals bonded together, and the two metals grow at different rates when they warm up. When the water \
boils, steam runs down a narrow tube onto the disc, the disc snaps from one curved shape to the other, and that \
movement pushes the switch open. Nothing measures the temperature in degrees; the shape of a strip of metal does \
the whole job, which is why the same design has worked for decades.

Question: I have three hours on a Saturday and I want to learn something new. What should I try?
Answer: Pick something you can practise with what you already own. Three good options are sketching the objects \
on your desk, learning ten phrases of a language you would like to hear on holiday, or cooking a dish you have \
only eaten in restaurants. Spend the first half hour reading or watching one short guide, then practise for two \
hours, and use the last thirty minutes to write down what went wrong and what you would change next time.

A short history of the town bridge. The first crossing was a line of flat stones that farmers used when the river \
was low. In 1762 the council paid for a wooden bridge with a toll of one penny for a person and two for a cart. \
It burned down in 1811, was rebuilt in stone by 1820, and was widened in 1958 so that two buses could pass. Today \
about 14,000 vehicles cross it on a weekday, and the old toll house is a small cafe that sells soup and bread.

Recipe: lentil soup for four people.
1. Rinse 250 g of red lentils until the water runs clear.
2. Soften one chopped onion, two carrots and a stick of celery in olive oil for ten minutes.
3. Add a teaspoon of cumin, the lentils and 1.2 litres of stock.
4. Simmer for twenty-five minutes, stirring now and then, until the lentils fall apart.
5. Season with salt, pepper and the juice of half a lemon; blend half of it if you like a thicker soup.

Dear Ms Patel, thank you for your letter of 3 March. I am sorry that the parcel arrived damaged. We have sent a \
replacement by tracked post, and it should reach you within five working days. There is no need to return the \
broken item. If anything else is wrong, please reply to this message and quote the order number 58-2291.

Why is the sky blue? Sunlight contains every colour. When it passes through the air, the tiny molecules of \
nitrogen and oxygen scatter short wavelengths much more strongly than long ones, so blue light is bounced around \
the whole sky while red and yellow light mostly travel straight on. At sunset the light crosses far more air \
before it reaches you, most of the blue has been scattered away, and the sun looks orange or red.

User: Can you check my Python? It should return the largest even number in a list, or None.
Assistant: Here is a version that handles an empty list and a list with no even numbers:

def largest_even(numbers):
    evens = [n for n in numbers if n % 2 == 0]
    return max(evens) if evens else None

For example, largest_even([3, 8, 5, 12, 7]) returns 12, and largest_even([1, 3]) returns None.

Notes from the garden club meeting. Eleven members came. The spring plant sale raised 340 pounds, which will pay \
for new hoses and a second compost bin. Tom reminded everyone that tomatoes should not go outside until the \
nights stay above ten degrees. Next month Priya will show how to take cuttings from lavender and rosemary, and \
the meeting after that is a visit to the walled garden at Ashby Hall.

Some rules of thumb for writing clearly. Put the main point in the first sentence. Use the words your reader \
uses, not the ones your field invented. Prefer short sentences, but vary their length so the text does not \
sound like a list. Cut any paragraph that says again what the previous one said. Read the draft aloud: where \
you stumble, your reader will too.

The train to Edinburgh leaves platform 4 at 09:42 and arrives at 14:05. Passengers for Dundee should change at \
Edinburgh Waverley. A trolley service with hot drinks and sandwiches runs between York and Newcastle. Please \
keep your luggage with you at all times, and mind the gap between the train and the platform edge.

How many people could stand on a football pitch? A full-size pitch is roughly 105 metres by 68 metres, about \
7,100 square metres. A crowd packed loosely takes about half a square metre per person, so the answer is near \
14,000; squeezed as tightly as a concert crowd, at about a quarter of a square metre each, it would be close to \
28,000. Real events keep the numbers far lower, because people need room to move and to leave safely.

Summary: small mechanisms can do clever work, good habits beat good intentions, and a clear answer states its \
assumptions. Thank you for reading.
"""
